"""The classifier and its adaptations: stem widening, pooling, which parameters
train for each adaptation, the parameter counts of every preset (the paper's
1,642,498 on CT-FM), and ``bids_adhd model-info`` (FMCIB and the ``paper`` preset:
tests/test_foundation_zoo.py).

Behaviour is tested on a narrow encoder (init_filters=4, 16³ inputs); the
counts of the real 77.8 M encoder are taken on PyTorch's meta device plus one
real (CPU, no forward pass) build.
"""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn as nn

from bids_adhd import cli
from bids_adhd.config import ModelConfig, load_pipeline
from bids_adhd.errors import UsageError
from bids_adhd.learn import foundation as fd
from bids_adhd.learn.classifier import ADHDClassifier, adapt_stem, adapter_state_dict, build_model
from bids_adhd.learn.lora import LoRAConv3d, lora_parameter_count

# SegResEncoder(init_filters=32, blocks_down=(1,2,2,4,4)): convs in residual blocks per level, widths
LEVELS = [(32, 2), (64, 4), (128, 4), (256, 8), (512, 8)]
ENCODER = 77_760_992
NORM = sum(2 * c * n for c, n in LEVELS)                    # 13,952
HEAD = 512 * 128 + 128 + 128 * 2 + 2                        # 65,922
LORA_FLAT = sum(n * lora_parameter_count(c, c, (3, 3, 3), 8) for c, n in LEVELS)              # 1,562,624
LORA_K2D = sum(n * lora_parameter_count(c, c, (3, 3, 3), 8, "kernel2d") for c, n in LEVELS)   # 669,696


@pytest.fixture()
def tiny_manifest():
    m = copy.deepcopy(fd.load_manifest("ct-fm"))
    m["architecture"]["kwargs"]["init_filters"] = 4
    return m


@pytest.fixture()
def no_weights(tmp_path, monkeypatch):
    monkeypatch.setenv(fd.ENV_WEIGHTS_DIR, str(tmp_path / "cache"))
    monkeypatch.setattr(fd, "IMAGE_MODELS_DIR", tmp_path / "opt")
    return tmp_path


def test_formulas_give_the_paper_numbers():
    assert (NORM, HEAD, LORA_FLAT) == (13_952, 65_922, 1_562_624)
    assert LORA_FLAT + NORM + HEAD == 1_642_498


def test_paper_ctfm_preset_counts():
    cfg = load_pipeline("paper-ctfm").model
    model, info = build_model(cfg, architecture_only=True)
    rep = info["parameters"]
    assert rep["trainable"] == 1_642_498
    assert abs(rep["trainable"] - 1.64e6) / 1.64e6 < 0.01
    assert info["encoder_parameters"] == ENCODER
    assert rep["lora"] == LORA_FLAT and rep["norm"] == NORM and info["head_parameters"] == HEAD
    # the encoder's own parameters all stay frozen except the BatchNorm affine ones
    assert rep["frozen"] == ENCODER - NORM == 77_747_040
    assert rep["total"] == ENCODER + LORA_FLAT + HEAD
    assert len(info["lora_layers"]) == 26
    assert isinstance(model.encoder.layers[4].blocks[3].conv2, LoRAConv3d)
    assert info["pretrained"] is False                     # architecture only: no weights


def test_real_encoder_build_counts_77_760_992():
    """One real build (CPU, no forward pass): the meta-device counts are the real ones."""
    enc = fd.build_encoder("ct-fm")
    assert sum(p.numel() for p in enc.parameters()) == ENCODER
    assert encoder_keys_are_monai_layout(enc)


def encoder_keys_are_monai_layout(enc) -> bool:
    keys = list(enc.state_dict())
    return keys[0] == "conv_init.weight" and "layers.4.blocks.3.conv2.weight" in keys and len(keys) == 161


# the part of the encoder that runs when the read-out stops at level 3 (the fast preset): conv_init,
# levels 0-3 (blocks), the downsamples 0->1, 1->2, 2->3; level 4 and the 3->4 downsample are removed
CONV3 = 27
ENCODER_TO_3 = (32 * CONV3 + sum(n * (c * c * CONV3 + 2 * c) for c, n in LEVELS[:4])
                + sum(c * 2 * c * CONV3 for c, _ in LEVELS[:3]))
LORA_TO_3 = sum(n * lora_parameter_count(c, c, (3, 3, 3), 8) for c, n in LEVELS[:4])

EXPECTED_PRESETS = {
    # name: (trainable, total)
    "paper-ctfm": (LORA_FLAT + NORM + HEAD, ENCODER + LORA_FLAT + HEAD),
    # fast: linear head over level 3's 256 averaged features; levels 0-3 trained (LoRA 645,120 +
    # norm 5,760); the encoder is truncated after level 3, so level 4 (and its LoRA) is not in the model
    "fast": (LORA_TO_3 + 5_760 + 256 * 2 + 2, ENCODER_TO_3 + LORA_TO_3 + 256 * 2 + 2),
    "default": (LORA_FLAT + NORM + HEAD, ENCODER + LORA_FLAT + HEAD),
    "peft-lora": (LORA_FLAT + NORM + HEAD, ENCODER + LORA_FLAT + HEAD),
    "linear-probe": (HEAD, ENCODER + HEAD),
    "full-finetune": (ENCODER + HEAD, ENCODER + HEAD),
    "scratch": (ENCODER + HEAD, ENCODER + HEAD),
}


@pytest.mark.parametrize("preset", sorted(EXPECTED_PRESETS))
def test_every_preset_builds_with_its_counts(preset):
    _, info = build_model(load_pipeline(preset).model, architecture_only=True)
    rep = info["parameters"]
    assert (rep["trainable"], rep["total"]) == EXPECTED_PRESETS[preset]
    run, lora = (ENCODER_TO_3, LORA_TO_3) if preset == "fast" else (ENCODER, LORA_FLAT)
    head = EXPECTED_PRESETS[preset][1] - run - (lora if preset in ("paper-ctfm", "fast", "default", "peft-lora")
                                                else 0)
    # encoder: always the whole published encoder; encoder_parameters_run: what the truncated model holds
    assert info["encoder_parameters"] == ENCODER and info["encoder_parameters_run"] == run
    assert info["full_finetune_trainable"] == ENCODER + head
    assert info["truncated"] == (["layers.4", "layers.3.downsample"] if preset == "fast" else [])


def test_kernel2d_and_two_channel_variants_count():
    cfg = dataclasses.replace(load_pipeline("paper-ctfm").model, lora_factorisation="kernel2d")
    _, info = build_model(cfg, architecture_only=True)
    assert info["parameters"]["trainable"] == LORA_K2D + NORM + HEAD == 749_570
    cfg = dataclasses.replace(load_pipeline("paper-ctfm").model, channels=("fa", "md"), pooling="multiscale")
    _, info = build_model(cfg, architecture_only=True)
    assert info["encoder_parameters"] == ENCODER + 32 * 27           # the stem takes a second channel
    assert info["head_parameters"] == 992 * 128 + 128 + 128 * 2 + 2


def test_model_info_json(capsys):
    assert cli.main(["model-info", "--pipeline", "paper-ctfm", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trainable"] == 1_642_498 and out["encoder"] == ENCODER
    assert out["full_finetune"] == ENCODER + HEAD and out["foundation"] == "ct-fm"
    assert out["total"] == ENCODER + LORA_FLAT + HEAD
    assert out["ratio_to_full"] == pytest.approx(1_642_498 / (ENCODER + HEAD))
    assert len(out["lora_per_layer"]) == 26
    assert out["lora_per_layer"]["encoder.layers.0.blocks.0.conv1"] == 8 * (32 * 27 + 32)
    assert sum(out["lora_per_layer"].values()) == LORA_FLAT


def test_model_info_table(capsys):
    assert cli.main(["model-info", "--pipeline", "linear-probe"]) == 0
    out = capsys.readouterr().out
    assert "65,922" in out and "77,760,992" in out and "ratio 0.08 %" in out and "of which run" not in out
    assert cli.main(["model-info", "--pipeline", "fast"]) == 0
    out = capsys.readouterr().out
    assert "77,760,992" in out and f"of which run {ENCODER_TO_3:>12,}" in out and "LoRA per layer (18 layers)" in out


# ---------------------------------------------------------------- behaviour on a narrow encoder
def test_stem_average_gives_the_one_channel_output_for_equal_channels(tiny_manifest):
    torch.manual_seed(0)
    one = fd.build_encoder(tiny_manifest).eval()
    two = adapt_stem(copy.deepcopy(one), 2, "average").eval()
    assert two.conv_init.in_channels == 2 and two.in_channels == 2
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        for a, b in zip(one(x), two(x.repeat(1, 2, 1, 1, 1))):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    dup = adapt_stem(copy.deepcopy(one), 2, "duplicate")
    with torch.no_grad():
        assert torch.allclose(dup.conv_init(x.repeat(1, 2, 1, 1, 1)), 2 * one.conv_init(x), rtol=1e-5, atol=1e-5)


def test_pooling_widths(tiny_manifest):
    enc = fd.build_encoder(tiny_manifest)
    x = torch.randn(2, 1, 16, 16, 16)
    avg = ADHDClassifier(enc, "avg", head_hidden=8).eval()
    multi = ADHDClassifier(enc, "multiscale", head_hidden=0).eval()
    assert avg.num_features == 64 and multi.num_features == 4 + 8 + 16 + 32 + 64
    with torch.no_grad():
        assert avg(x).shape == (2, 2) and multi(x).shape == (2, 2)
        assert torch.allclose(avg.features(x), enc(x)[-1].mean(dim=(2, 3, 4)))


def test_feature_levels_read_out_and_stop_early(tiny_manifest, no_weights):
    enc = fd.build_encoder(tiny_manifest).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        full = enc(x)
    with pytest.raises(UsageError, match="levels 0 to 4"):
        ADHDClassifier(enc, "avg", levels=[5])
    lv = ADHDClassifier(enc, "avg", head_hidden=0, levels=[1, 2]).eval()
    assert lv.num_features == 8 + 16 and lv.depth == 3
    # truncated in place: levels 3 and 4 and the 2->3 downsample are gone, not skipped
    assert len(enc.layers) == 3 and isinstance(enc.layers[2]["downsample"], nn.Identity)
    assert lv.truncated == ("layers.3", "layers.4", "layers.2.downsample")
    assert lv.was_truncated("encoder.layers.4.blocks.0.norm1.running_mean")
    assert not lv.was_truncated("encoder.layers.2.blocks.0.norm1.running_mean")
    ran = []
    hooks = [layer["blocks"].register_forward_hook(lambda *a, i=i: ran.append(i)) for i, layer in enumerate(enc.layers)]
    with torch.no_grad():
        f = lv.features(x)
    for h in hooks:
        h.remove()
    assert ran == [0, 1, 2]
    assert torch.equal(f, torch.cat([full[1].mean(dim=(2, 3, 4)), full[2].mean(dim=(2, 3, 4))], 1))
    cfg = ModelConfig(lora_rank=2, head_hidden=0, feature_levels=(2,), pretrained=False)
    model, info = build_model(cfg, manifest=tiny_manifest)
    assert not any(n.startswith(("encoder.layers.3.", "encoder.layers.4.")) for n, _ in model.named_parameters())
    assert any(n.startswith("encoder.layers.2.") for n in _trainable(model))
    assert info["lora_layers"] and all(not n.startswith(("layers.3.", "layers.4.")) for n in info["lora_layers"])
    with pytest.raises(UsageError, match="feature_levels"):
        ModelConfig(feature_levels=(1, 1))


def _old_segres_maps(encoder, x, depth):
    """The classifier's own SegResEncoder loop before it truncated the encoder (kept here as the reference)."""
    outputs = []
    x = encoder.conv_init(x)
    for level in encoder.layers[:depth]:
        x = level["blocks"](x)
        outputs.append(x)
        x = level["downsample"](x)
    return outputs


def _randomise(model, seed):
    """Non-trivial trained-like state: every LoRA factor, norm parameter and BatchNorm statistic random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and (".lora_" in name or "norm" in name):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + (0.5 if "running_var" in name else -0.25))
    return model.eval()


def _whole_and_truncated(tiny_manifest, cfg, seed=3):
    """The same seeded build twice: read-out of every level (no truncation) and ``cfg``'s (truncated)."""
    torch.manual_seed(seed)
    whole, _ = build_model(dataclasses.replace(cfg, pooling="multiscale", feature_levels=()), manifest=tiny_manifest)
    torch.manual_seed(seed)
    model, info = build_model(cfg, manifest=tiny_manifest)
    # the truncation draws nothing at random: the same seed gives the same encoder and LoRA initialisation
    ref = whole.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items() if k.startswith("encoder."))
    _randomise(whole, 7)
    model.load_state_dict({k: v for k, v in whole.state_dict().items() if k.startswith("encoder.")}, strict=False)
    return whole, model.eval(), info


def test_truncated_encoder_features_equal_the_old_loop(tiny_manifest, no_weights):
    cfg = ModelConfig(lora_rank=2, head_hidden=8, pooling="multiscale", feature_levels=(1, 3), pretrained=False)
    whole, model, info = _whole_and_truncated(tiny_manifest, cfg)
    assert info["truncated"] == ["layers.4", "layers.3.downsample"] and len(model.encoder.layers) == 4
    assert not any(k.startswith("encoder.layers.4.") for k in model.state_dict())     # no frozen LoRA left there
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        old = _old_segres_maps(whole.encoder, whole.frame.apply(x), 4)
        assert torch.equal(model.features(x), torch.cat([old[i].float().mean(dim=(2, 3, 4)) for i in (1, 3)], 1))


def test_format_1_adapter_predicts_what_it_predicted_before(tiny_manifest, no_weights, tmp_path):
    """An adapter in the old layout (statistics of the dropped level 4 included) gives bit-identical logits."""
    from safetensors.torch import save_file

    from bids_adhd.errors import DataError
    from bids_adhd.learn.adapter import FORMAT, FORMAT_1, load_into, read_adapter, save_adapter

    cfg = ModelConfig(lora_rank=2, head_hidden=8, feature_levels=(3,), pretrained=False)
    whole, model, _ = _whole_and_truncated(tiny_manifest, cfg)
    old_tensors = adapter_state_dict(model)
    old_tensors.update({k: v for k, v in adapter_state_dict(whole).items() if k.startswith("encoder.layers.4.")})
    assert any(".running_mean" in k for k in old_tensors if k.startswith("encoder.layers.4."))
    meta = save_adapter(tmp_path / "v2.safetensors", model, foundation="ct-fm", base_weights=None, init_seed=3,
                        fingerprint="f" * 64, pipeline={}, grid=((16, 16, 16), torch.eye(4).numpy()),
                        train_subjects=["01"], class_names=["TD", "ADHD"], label_column="group")
    assert meta["format"] == FORMAT == "bids_adhd-adapter/2"
    old_path = tmp_path / "v1.safetensors"
    save_file(old_tensors, str(old_path), metadata={**meta, "format": FORMAT_1})
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        before = model.head(_old_segres_maps(whole.encoder, whole.frame.apply(x), 4)[3].float().mean(dim=(2, 3, 4)))
    tensors, meta1 = read_adapter(old_path)
    assert meta1["format"] == FORMAT_1
    torch.manual_seed(3)
    rebuilt, _ = build_model(cfg, manifest=tiny_manifest)
    with pytest.raises(DataError, match="unknown"):          # read as format 2, the level-4 tensors do not fit
        load_into(rebuilt, tensors, old_path, FORMAT)
    load_into(rebuilt, tensors, old_path, meta1["format"])
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), before)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("adaptation", ["lora", "peft-lora", "linear-probe", "full", "scratch"])
def test_adaptations_train_the_right_parameters(adaptation, tiny_manifest, no_weights):
    if adaptation == "peft-lora":
        pytest.importorskip("peft")
    cfg = ModelConfig(adaptation=adaptation, lora_rank=2, head_hidden=8, pretrained=adaptation != "scratch",
                      train_norm=adaptation != "linear-probe")
    torch.manual_seed(0)
    model, info = build_model(cfg, manifest=tiny_manifest)
    names = _trainable(model)
    assert any(n.startswith("head.") for n in names)
    enc = {n for n in names if n.startswith("encoder.")}
    if adaptation in ("lora", "peft-lora"):
        assert enc and all(".lora_" in n or ".norm" in n for n in enc)
        assert sum(".lora_" in n for n in enc) == 52                   # A and B of 26 convolutions
        assert info["parameters"]["lora"] == sum(
            lora_parameter_count(c, c, (3, 3, 3), 2) for c, n in [(4, 2), (8, 4), (16, 4), (32, 8), (64, 8)]
            for _ in range(n))
    elif adaptation == "linear-probe":
        assert not enc
        model.train()
        assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm3d))
        assert model.head.training
    else:
        assert enc == {n for n, _ in model.encoder.named_parameters(prefix="encoder")}
    assert info["pretrained"] is False                  # no weights anywhere in this test


def test_one_training_step_moves_only_the_adapter(tiny_manifest, no_weights):
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(lora_rank=2, head_hidden=8), manifest=tiny_manifest)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(2, 1, 16, 16, 16), torch.tensor([0, 1])
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    opt.step()
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    sd = adapter_state_dict(model)
    assert "encoder.layers.0.blocks.0.conv1.lora_A" in sd and "head.0.weight" in sd
    assert "encoder.layers.0.blocks.0.norm1.running_mean" in sd
    assert not any(k.endswith("base_layer.weight") for k in sd)


def test_scratch_ignores_weights_in_the_cache(tiny_manifest, no_weights):
    path = no_weights / "cache" / "ct-fm" / "model.safetensors"
    path.parent.mkdir(parents=True)
    from safetensors.torch import save_file
    save_file(fd.build_encoder(tiny_manifest).state_dict(), str(path))
    _, info = build_model(ModelConfig(adaptation="scratch", pretrained=True, head_hidden=8), manifest=tiny_manifest)
    assert info["pretrained"] is False
    _, info = build_model(ModelConfig(head_hidden=8, lora_rank=2), manifest=tiny_manifest)
    assert info["pretrained"] is True and info["weights_path"] == str(path)

"""The model zoo of two (CT-FM, FMCIB): manifests, safe checkpoint import, strict loading through the real
path, the input frame the network sees, 3D LoRA on FMCIB and the paper presets' arithmetic.

Checkpoints are built with each model's real key layout (FMCIB's public loader,
fmcib/models/resnet50.py: ``trunk_state_dict``, or ``state_dict`` with a
``model.backbone.`` prefix; CT-FM: SegResEncoder keys) from narrow copies of
the real architectures (random values; the key names do not depend on width).
"""
from __future__ import annotations

import copy
import hashlib
import json
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from safetensors.torch import save_file

from bids_adhd import cli
from bids_adhd.config import ModelConfig, TemplateConfig, load_pipeline
from bids_adhd.dmri.template import template_grid
from bids_adhd.errors import DataError
from bids_adhd.learn import foundation as fd
from bids_adhd.learn.classifier import build_model
from bids_adhd.learn.data import model_frame
from bids_adhd.learn.info import model_report
from bids_adhd.learn.lora import LoRAConv3d

FMCIB_TRUNK = 184_477_824
CTFM_ENCODER = 77_760_992


def tiny(name: str) -> dict:
    m = copy.deepcopy(fd.load_manifest(name))
    if name == "fmcib":
        m["architecture"]["kwargs"]["widen_factor"] = 0.125      # 8 ... 64 planes instead of 128 ... 1024
    else:
        m["architecture"]["kwargs"]["init_filters"] = 4
    return m


def trained_like(manifest, seed=0) -> torch.nn.Module:
    """An encoder with random weights and non-default BatchNorm statistics (so loading them is visible)."""
    torch.manual_seed(seed)
    enc = fd.build_encoder(manifest)
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return enc.eval()


def use_manifest(monkeypatch, manifest):
    real = fd.load_manifest
    monkeypatch.setattr(fd, "load_manifest", lambda name: copy.deepcopy(manifest) if name == manifest["name"]
                        else real(name))


# ---------------------------------------------------------------- manifests
def test_manifests_describe_both_models():
    fm, ct = fd.load_manifest("fmcib"), fd.load_manifest("ct-fm")
    assert fm["architecture"]["class"] == "monai.networks.nets.resnet.resnet50"
    assert fm["architecture"]["kwargs"] == {"pretrained": False, "spatial_dims": 3, "n_input_channels": 1,
                                            "widen_factor": 2, "conv1_t_stride": 2, "feed_forward": False,
                                            "bias_downsample": True}      # as fmcib_model() passes it
    assert fm["source"]["code_commit"] == "1f1c0c8725c110c9c70cb466467a55e3160760c9"
    assert fm["source"]["url"] == "https://zenodo.org/records/10528450/files/model_weights.torch?download=1"
    assert fm["source"]["revision"] == "zenodo:10528450" and ct["source"]["revision"] == "main"
    assert "NOT PINNED" in ct["source"]["revision_note"] and ct["sha256"] is None
    assert fm["state_dict"]["containers"] == ["trunk_state_dict", "state_dict"]
    assert "model.backbone." in fm["state_dict"]["key_prefixes"]
    for m in (fm, ct):
        assert m["input"]["orientation"] == "SPL" and m["input"]["value_range"] == [0.0, 1.0]
        assert len(m["input"]["native_spacing_mm"]) == 3 and m["licence"] and m["reference"]
        assert m["lora"]["target"] and m["architecture"]["family"] in fd.FAMILIES
    assert ct["input"]["native_spacing_mm"] == [3.0, 1.0, 1.0] and fm["input"]["patch_size"] == [50, 50, 50]


def test_real_sizes_on_the_meta_device():
    for name, n in (("fmcib", FMCIB_TRUNK), ("ct-fm", CTFM_ENCODER)):
        with torch.device("meta"):
            enc = fd.build_encoder(name)
        assert fd.count_parameters(enc) == n == fd.load_manifest(name)["architecture"]["parameters"]
        assert fd.encoder_family(fd.load_manifest(name)).feature_channels(enc) == \
            fd.load_manifest(name)["architecture"]["feature_channels"]


@pytest.mark.parametrize("name", ["fmcib", "ct-fm"])
def test_family_adapter_reproduces_the_encoder_output(name):
    enc = trained_like(tiny(name))
    fam = fd.encoder_family(tiny(name))
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        maps = fam.encode(enc, x)
        ref = enc(x)
    if name == "fmcib":        # feed_forward=False: the trunk returns the global average of layer4
        assert torch.allclose(maps[-1].mean(dim=(2, 3, 4)), ref, atol=1e-6)
    else:
        assert all(torch.equal(a, b) for a, b in zip(maps, ref))
    assert [m.shape[1] for m in maps] == fam.feature_channels(enc)


@pytest.mark.parametrize("name", ["fmcib", "ct-fm"])
def test_truncated_encoder_gives_the_same_first_maps_bit_for_bit(name):
    """Truncated to 2 levels, the encoder returns exactly the whole one's first 2 maps and holds nothing deeper."""
    import copy

    enc = trained_like(tiny(name))
    fam = fd.encoder_family(tiny(name))
    short = copy.deepcopy(enc)
    removed = fam.truncate(short, 2)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        whole, maps = fam.encode(enc, x), fam.encode(short, x)
    assert len(maps) == 2 and all(torch.equal(a, b) for a, b in zip(maps, whole[:2]))
    assert fam.feature_channels(short) == fam.feature_channels(enc)[:2]
    if name == "ct-fm":
        assert removed == ["layers.2", "layers.3", "layers.4", "layers.1.downsample"]
        assert torch.equal(short(x)[1], whole[1])          # MONAI's own SegResEncoder.forward, truncated
    else:
        assert removed == ["layer3", "layer4"] and not hasattr(short, "layer3")
    assert fd.count_parameters(short) < fd.count_parameters(enc)
    assert fam.truncate(short, 2) == []                     # nothing left to remove


# ---------------------------------------------------------------- import + strict load
@pytest.mark.parametrize("layout", ["trunk_state_dict", "lighter"])
def test_fmcib_checkpoint_converted_once_then_loaded_strict(weights_env, monkeypatch, capsys, layout):
    manifest = tiny("fmcib")
    use_manifest(monkeypatch, manifest)
    src = trained_like(manifest)
    sd = src.state_dict()
    ckpt = weights_env / "fmcib.torch"
    if layout == "trunk_state_dict":            # VISSL: what fmcib.torch holds
        torch.save({"trunk_state_dict": sd, "head_state_dict": {"0.0.weight": torch.zeros(2, 2)}}, ckpt)
    else:                                       # Lighter: state_dict with the model.backbone. prefix
        torch.save({"state_dict": {f"model.backbone.{k}": v for k, v in sd.items()}, "epoch": 7}, ckpt)
    assert cli.main(["fetch-model", "fmcib", "--from", str(ckpt)]) == 0
    target = weights_env / "cache" / "fmcib" / "model.safetensors"
    record = json.loads(fd.provenance_path(target).read_text())
    assert record["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    assert record["source_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert record["container"] == ("trunk_state_dict" if layout == "trunk_state_dict" else "state_dict")
    assert record["key_prefix"] == ("" if layout == "trunk_state_dict" else "model.backbone.")
    assert record["sha256"] in capsys.readouterr().out
    enc, info = fd.load_encoder(ModelConfig(foundation="fmcib"), manifest=manifest)     # found in the cache
    assert info["pretrained"] and info["sha256_verified"] and info["sha256_source"] == "provenance"
    enc.eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc(x), src(x))
    assert all(torch.equal(v, sd[k]) for k, v in enc.state_dict().items())   # every key, strict


def test_a_tampered_converted_file_fails_its_recorded_sha256(weights_env, monkeypatch):
    manifest = tiny("fmcib")
    use_manifest(monkeypatch, manifest)
    ckpt = weights_env / "fmcib.torch"
    torch.save({"trunk_state_dict": trained_like(manifest).state_dict()}, ckpt)
    assert cli.main(["fetch-model", "fmcib", "--from", str(ckpt)]) == 0
    target = weights_env / "cache" / "fmcib" / "model.safetensors"
    save_file({k: v.contiguous() for k, v in trained_like(manifest, seed=1).state_dict().items()}, str(target))
    with pytest.raises(DataError) as exc:
        fd.load_encoder(ModelConfig(foundation="fmcib"), manifest=manifest)
    assert "sha256" in str(exc.value) and exc.value.exit_code == 65


class _Bomb:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_fetch_model_from_refuses_what_needs_full_unpickling(weights_env, monkeypatch, capsys):
    manifest = tiny("fmcib")
    use_manifest(monkeypatch, manifest)
    marker = weights_env / "UNPICKLED"
    sd = dict(trained_like(manifest).state_dict())
    for fmt in ("torch-zip", "pickle"):
        path = weights_env / f"evil-{fmt}.torch"
        payload = {"trunk_state_dict": sd, "bomb": _Bomb(marker)}
        if fmt == "torch-zip":
            torch.save(payload, path)
        else:
            with open(path, "wb") as fh:
                pickle.dump(payload, fh, protocol=4)
        assert cli.main(["fetch-model", "fmcib", "--from", str(path)]) == 65
        err = capsys.readouterr().err
        assert "refused" in err or "not a readable PyTorch checkpoint" in err
        assert not marker.exists() and not (weights_env / "cache" / "fmcib" / "model.safetensors").exists()
    # the loader never converts: a renamed pickle is refused at the header, nothing unpickled
    renamed = weights_env / "model.safetensors"
    torch.save({"trunk_state_dict": sd, "bomb": _Bomb(marker)}, renamed)
    with pytest.raises(DataError, match="never unpickles"):
        fd.load_encoder(ModelConfig(foundation="fmcib"), weights=renamed, manifest=manifest)
    assert not marker.exists()


def test_fetch_model_from_is_strict_about_keys(weights_env, monkeypatch, capsys):
    manifest = tiny("fmcib")
    use_manifest(monkeypatch, manifest)
    sd = dict(trained_like(manifest).state_dict())
    sd.pop("layer3.1.conv2.weight")
    path = weights_env / "partial.torch"
    torch.save({"trunk_state_dict": sd}, path)
    assert cli.main(["fetch-model", "fmcib", "--from", str(path)]) == 65
    assert "missing key(s): layer3.1.conv2.weight" in capsys.readouterr().err


def test_ct_fm_safetensors_from_file_recorded_and_loaded(weights_env, monkeypatch):
    manifest = tiny("ct-fm")
    use_manifest(monkeypatch, manifest)
    src = trained_like(manifest)
    path = weights_env / "downloaded.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    assert cli.main(["fetch-model", "ct-fm", "--from", str(path)]) == 0
    _, info = fd.load_encoder(ModelConfig(), manifest=manifest)
    assert info["pretrained"] and info["sha256_source"] == "provenance"


def test_fetch_model_fmcib_offline_exits_66_and_says_how(weights_env, monkeypatch, capsys):
    monkeypatch.setattr(fd, "_host_unreachable", lambda url: "cannot resolve zenodo.org")
    assert cli.main(["fetch-model", "fmcib"]) == 66
    err = capsys.readouterr().err
    assert "--from FILE" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_fetch_model_records_the_hub_commit_it_resolved(weights_env, monkeypatch):
    """CT-FM's manifest cannot pin a commit (none verified here): the provenance record keeps the one resolved."""
    hub = pytest.importorskip("huggingface_hub")
    from huggingface_hub._local_folder import write_download_metadata

    manifest = tiny("ct-fm")
    use_manifest(monkeypatch, manifest)
    commit = "0123456789abcdef0123456789abcdef01234567"

    def fake_download(repo_id, filename, revision=None, local_dir=None, **kwargs):
        out = fd.Path(local_dir) / filename
        save_file({k: v.contiguous() for k, v in trained_like(manifest).state_dict().items()}, str(out))
        write_download_metadata(fd.Path(local_dir), filename, commit, hashlib.sha256(out.read_bytes()).hexdigest())
        return str(out)
    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(fd, "_hub_unreachable", lambda: None)
    assert cli.main(["fetch-model", "ct-fm"]) == 0
    record = json.loads(fd.provenance_path(fd.cache_dir("ct-fm") / "model.safetensors").read_text())
    assert record["origin"] == "huggingface:project-lighter/ct_fm_feature_extractor@main"
    assert record["revision_resolved"] == commit and record["etag"] == record["sha256"]


def test_required_weights_refuse_random_init_but_not_pretrained_false(weights_env, monkeypatch):
    """BIDS_ADHD_REQUIRE_WEIGHTS (set in the images): missing weights are exit 66; 'scratch' still builds."""
    from bids_adhd.errors import MissingInputError

    manifest = tiny("fmcib")
    monkeypatch.setenv(fd.ENV_REQUIRE_WEIGHTS, "1")
    with pytest.raises(MissingInputError) as exc:
        fd.load_encoder(ModelConfig(foundation="fmcib"), manifest=manifest)
    assert exc.value.exit_code == 66 and "fetch-model fmcib" in exc.value.message
    assert fd.ENV_REQUIRE_WEIGHTS in exc.value.message
    _, info = fd.load_encoder(ModelConfig(foundation="fmcib", pretrained=False), manifest=manifest)
    assert info["init"] == "random (pretrained: false)"
    monkeypatch.setenv(fd.ENV_REQUIRE_WEIGHTS, "0")
    _, info = fd.load_encoder(ModelConfig(foundation="fmcib"), manifest=manifest)
    assert info["init"] == "random (weights missing)" and info["warning"]


# ---------------------------------------------------------------- the frame the network sees
def _world_coordinate_images(cfg: TemplateConfig):
    """Three maps on the template grid whose values are the voxel's x, y and z in mm (scaled to [0, 1])."""
    shape, affine = template_grid(cfg)
    ijk = np.indices(shape).reshape(3, -1)
    xyz = (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *shape)
    return shape, affine, (xyz - xyz.min()) / (xyz.max() - xyz.min())


@pytest.mark.parametrize("name", ["ct-fm", "fmcib"])
def test_the_network_reads_the_manifests_frame(name):
    """Hook the encoder's stem: its input must equal nibabel's reorientation of the template image."""
    manifest = tiny(name)
    cfg = TemplateConfig(resolution_mm=6.0, shape=(32, 32, 32))
    shape, affine, coords = _world_coordinate_images(cfg)
    model, _ = build_model(ModelConfig(foundation=name, pretrained=False, head_hidden=0), manifest=manifest)
    seen = []
    stem = getattr(model.encoder, fd.encoder_family(manifest).stem)
    stem.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().numpy()))
    model.eval()
    for axis in range(3):
        with torch.no_grad():
            model(torch.from_numpy(coords[axis][None, None].astype(np.float32)))
        img = nib.Nifti1Image(coords[axis].astype(np.float32), affine)
        target = manifest["input"]["orientation"]
        ref = img.as_reoriented(ornt_transform(io_orientation(affine), axcodes2ornt(tuple(target))))
        assert nib.aff2axcodes(ref.affine) == tuple(target)
        assert np.array_equal(seen[-1][0, 0], np.asarray(ref.dataobj))
    # and in words: axis 0 runs to superior (z grows), axis 1 to posterior (y falls), axis 2 to left (x falls)
    x_seen, y_seen, z_seen = (s[0, 0] for s in seen[-3:])
    assert np.all(np.diff(z_seen, axis=0) > 0) and np.all(np.diff(y_seen, axis=1) < 0)
    assert np.all(np.diff(x_seen, axis=2) < 0)


def test_frame_identity_and_value_range():
    grid = model_frame({"orientation": "RAS"})
    x = np.random.default_rng(0).random((2, 3, 4, 5))
    assert np.array_equal(grid.apply(x), x)
    scaled = model_frame({"orientation": "RAS", "value_range": [-1.0, 1.0]})
    assert np.allclose(scaled.apply(x), 2 * x - 1)
    with pytest.raises(DataError):
        model_frame({"orientation": "SPX"})


# ---------------------------------------------------------------- 3D LoRA on FMCIB
def test_lora_on_fmcib_wraps_stem_bottlenecks_and_shortcuts_and_trains():
    manifest = tiny("fmcib")
    cfg = dataclasses_replace(load_pipeline("paper-fmcib").model, pretrained=False)
    model, info = build_model(cfg, manifest=manifest)
    enc = model.encoder
    kernels = {tuple(m.kernel_size) for m in enc.modules() if isinstance(m, LoRAConv3d)}
    assert kernels == {(7, 7, 7), (3, 3, 3), (1, 1, 1)} and len(info["lora_layers"]) == 53
    assert isinstance(enc.conv1, LoRAConv3d) and isinstance(enc.layer4[0].downsample[0], LoRAConv3d)
    assert all(m.factorisation == "kernel2d" for m in enc.modules() if isinstance(m, LoRAConv3d))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".bn" in n or "downsample.1" in n or n.startswith("head.") for n in trainable)
    x = torch.rand(2, 1, 32, 32, 32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    opt.step()
    after = dict(model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in after if n.endswith("lora_B"))
    assert all(torch.equal(before[n], after[n]) for n in after if n.endswith("base_layer.weight"))


def dataclasses_replace(obj, **kw):
    import dataclasses
    return dataclasses.replace(obj, **kw)


# ---------------------------------------------------------------- the arithmetic of the presets
def test_paper_is_fmcib_and_fits_both_published_numbers(capsys):
    assert cli.main(["model-info", "--pipeline", "paper", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["foundation"] == "fmcib" and r["encoder"] == FMCIB_TRUNK
    assert abs(r["trainable"] - 1_640_000) / 1_640_000 < 0.01
    assert r["full_finetune"] / r["trainable"] >= 113 and r["full_finetune"] == FMCIB_TRUNK + r["head"]
    assert r["trainable"] == r["lora"] + r["norm"] + r["head"] == 1_396_104 + 106_240 + 131_170
    ct = model_report("paper-ctfm")
    assert ct["encoder"] == CTFM_ENCODER and abs(ct["trainable"] - 1_640_000) / 1_640_000 < 0.01
    assert ct["full_finetune"] / ct["trainable"] < 113                  # why paper is not CT-FM
    assert model_report("paper-fmcib")["trainable"] == r["trainable"]


@pytest.mark.parametrize("preset", ["fast", "linear-probe", "full-finetune", "peft-lora", "scratch"])
def test_baselines_stay_on_ct_fm(preset):
    import yaml

    from bids_adhd.config import pipelines_dir
    assert yaml.safe_load((pipelines_dir() / f"{preset}.yaml").read_text())["base"] == "paper-ctfm"
    assert load_pipeline(preset).model.foundation == "ct-fm"

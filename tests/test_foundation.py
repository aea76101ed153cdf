"""Foundation weights: search order, safetensors-only loading with full checks,
random-init fallback, and the fetch-model command offline.

Checkpoints are written from a fresh MONAI SegResEncoder (the real CT-FM key
layout: conv_init.weight, layers.<l>.blocks.<b>.norm1.weight, ...), made
narrow (init_filters=4) to stay small; the key names do not depend on width.
"""
from __future__ import annotations

import copy
import hashlib
import json
import pickle
import time

import pytest
import torch
from safetensors.torch import save_file

from bids_adhd import cli
from bids_adhd.config import ModelConfig
from bids_adhd.errors import DataError, MissingInputError
from bids_adhd.learn import foundation as fd


@pytest.fixture()
def tiny_manifest():
    m = fd.load_manifest("ct-fm")
    m = copy.deepcopy(m)
    m["architecture"]["kwargs"]["init_filters"] = 4
    return m


def _checkpoint(manifest, path, prefix="", edit=None, seed=0):
    torch.manual_seed(seed)
    src = fd.build_encoder(manifest)
    with torch.no_grad():                       # non-default BN statistics, so loading them is visible
        for m in src.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    sd = {prefix + k: v.contiguous() for k, v in src.state_dict().items()}
    if edit:
        edit(sd)
    save_file(sd, str(path))
    return src


def _one_line(exc_info):
    msg = str(exc_info.value)
    assert "\n" not in msg and len(msg) < 600
    return msg


@pytest.mark.parametrize("prefix", ["", "encoder."])
def test_checkpoint_roundtrip_reproduces_outputs(tmp_path, tiny_manifest, weights_env, prefix):
    path = tmp_path / "model.safetensors"
    src = _checkpoint(tiny_manifest, path, prefix=prefix).eval()
    enc, info = fd.load_encoder(ModelConfig(), weights=path, manifest=tiny_manifest)
    enc.eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        for a, b in zip(enc(x), src(x)):
            assert torch.equal(a, b)
    assert info["pretrained"] is True and info["weights_path"] == str(path)
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["sha256_verified"] is False and info["key_prefix"] == prefix


def test_known_sha256_is_verified(tmp_path, tiny_manifest, weights_env):
    path = tmp_path / "model.safetensors"
    _checkpoint(tiny_manifest, path)
    good = dict(tiny_manifest, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    _, info = fd.load_encoder(ModelConfig(), weights=path, manifest=good)
    assert info["sha256_verified"] is True
    bad = dict(tiny_manifest, sha256="0" * 64)
    with pytest.raises(DataError) as exc:
        fd.load_encoder(ModelConfig(), weights=path, manifest=bad)
    assert "sha256" in _one_line(exc) and str(path) in str(exc.value)


@pytest.mark.parametrize("edit,words", [
    (lambda sd: sd.pop("layers.2.blocks.1.conv1.weight"), ["missing", "layers.2.blocks.1.conv1.weight"]),
    (lambda sd: sd.__setitem__("layers.0.blocks.0.conv1.weight", torch.zeros(4, 4, 3, 3, 1)),
     ["wrong shape", "layers.0.blocks.0.conv1.weight", "(4, 4, 3, 3, 1)"]),
    (lambda sd: sd.__setitem__("decoder.head.weight", torch.zeros(2)), ["unexpected", "decoder.head.weight"]),
    (lambda sd: sd["conv_init.weight"].view(-1).__setitem__(0, float("nan")), ["non-finite", "conv_init.weight"]),
])
def test_mismatched_checkpoint_is_a_one_line_data_error(tmp_path, tiny_manifest, weights_env, edit, words):
    path = tmp_path / "model.safetensors"
    _checkpoint(tiny_manifest, path, edit=edit)
    enc = fd.build_encoder(tiny_manifest)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    with pytest.raises(DataError) as exc:
        fd.load_weights(enc, path, name="ct-fm")
    msg = _one_line(exc)
    assert exc.value.exit_code == 65
    for w in words:
        assert w in msg
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())   # untouched


def test_missing_num_batches_tracked_is_tolerated(tmp_path, tiny_manifest, weights_env):
    path = tmp_path / "model.safetensors"
    _checkpoint(tiny_manifest, path,
                edit=lambda sd: [sd.pop(k) for k in [k for k in sd if k.endswith("num_batches_tracked")]])
    _, info = fd.load_encoder(ModelConfig(), weights=path, manifest=tiny_manifest)
    assert info["pretrained"]


class _Bomb:
    """Unpickling this creates a file: proof that nothing was unpickled when the file stays absent."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fmt", ["torch-zip", "pickle"])
def test_pickle_named_safetensors_is_refused_without_unpickling(tmp_path, tiny_manifest, weights_env, fmt):
    marker = tmp_path / "UNPICKLED"
    path = tmp_path / "model.safetensors"
    payload = {"conv_init.weight": torch.zeros(4, 1, 3, 3, 3), "bomb": _Bomb(marker)}
    if fmt == "torch-zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=4)
    with pytest.raises(DataError) as exc:
        fd.load_encoder(ModelConfig(), weights=path, manifest=tiny_manifest)
    msg = _one_line(exc)
    assert "not safetensors" in msg and "never unpickles" in msg
    assert not marker.exists()


def test_truncated_and_foreign_files_are_refused(tmp_path, tiny_manifest, weights_env):
    path = tmp_path / "model.safetensors"
    _checkpoint(tiny_manifest, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as exc:
        fd.load_encoder(ModelConfig(), weights=path, manifest=tiny_manifest)
    assert "corrupt" in _one_line(exc) or "not a safetensors" in str(exc.value)
    path.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(DataError, match="not a safetensors file"):
        fd.load_encoder(ModelConfig(), weights=path, manifest=tiny_manifest)


def test_explicit_weights_path_that_does_not_exist(tmp_path, tiny_manifest, weights_env):
    with pytest.raises(MissingInputError) as exc:
        fd.load_encoder(ModelConfig(), weights=tmp_path / "nope.safetensors", manifest=tiny_manifest)
    assert exc.value.exit_code == 66 and "nope.safetensors" in _one_line(exc)


def test_search_order_explicit_then_cache_then_image(tmp_path, weights_env):
    cache_file = tmp_path / "cache" / "ct-fm" / "model.safetensors"
    image_file = tmp_path / "opt" / "ct-fm" / "model.safetensors"
    explicit = tmp_path / "mine.safetensors"
    assert fd.find_weights("ct-fm") is None
    image_file.parent.mkdir(parents=True)
    image_file.write_bytes(b"x")
    assert fd.find_weights("ct-fm") == image_file
    cache_file.parent.mkdir(parents=True)
    cache_file.write_bytes(b"x")
    assert fd.find_weights("ct-fm") == cache_file
    explicit.write_bytes(b"x")
    assert fd.find_weights("ct-fm", explicit) == explicit
    assert fd.weight_search_paths("ct-fm") == [cache_file, image_file]


def test_default_cache_is_under_home(monkeypatch, tmp_path):
    monkeypatch.delenv(fd.ENV_WEIGHTS_DIR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fd.cache_dir("ct-fm") == tmp_path / ".cache" / "bids_adhd" / "models" / "ct-fm"


def test_no_weights_anywhere_gives_random_init_and_a_loud_warning(tiny_manifest, weights_env, caplog):
    with caplog.at_level("WARNING", logger="bids_adhd"):
        enc, info = fd.load_encoder(ModelConfig(), manifest=tiny_manifest)
    assert info["pretrained"] is False and info["weights_path"] is None and info["sha256"] is None
    assert "RANDOMLY INITIALISED" in caplog.text and "fetch-model" in caplog.text
    assert str(weights_env / "cache" / "ct-fm" / "model.safetensors") in caplog.text
    assert "randomly initialised" in info["warning"]
    assert info["init"] == "random (weights missing)"
    assert sum(p.numel() for p in enc.parameters()) > 0


def test_pretrained_false_never_loads(tmp_path, tiny_manifest, weights_env):
    path = weights_env / "cache" / "ct-fm" / "model.safetensors"
    path.parent.mkdir(parents=True)
    _checkpoint(tiny_manifest, path)
    _, info = fd.load_encoder(ModelConfig(pretrained=False), manifest=tiny_manifest)
    assert info["pretrained"] is False and info["weights_path"] is None
    _, info = fd.load_encoder(ModelConfig(), manifest=tiny_manifest)      # found in the cache
    assert info["pretrained"] is True and info["weights_path"] == str(path)


def test_manifest_describes_ct_fm():
    m = fd.load_manifest("ct-fm")
    assert m["source"]["repo_id"] == "project-lighter/ct_fm_feature_extractor"
    assert m["source"]["filename"] == "model.safetensors"
    assert m["sha256"] is None and "unknown" in m["sha256_note"]
    assert m["architecture"]["class"] == "monai.networks.nets.segresnet_ds.SegResEncoder"
    assert m["architecture"]["kwargs"] == {"spatial_dims": 3, "in_channels": 1, "init_filters": 32,
                                           "blocks_down": [1, 2, 2, 4, 4]}
    assert m["licence"] == "Apache-2.0" and "mri_mapping" in m["input"]


# ---------------------------------------------------------------- fetch-model
def test_fetch_model_offline_exits_66_naming_the_cache_path(weights_env, monkeypatch, capsys):
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)   # the real library, in offline mode
    t0 = time.monotonic()
    rc = cli.main(["fetch-model", "ct-fm"])
    err = capsys.readouterr().err
    assert rc == 66
    errors = [line for line in err.splitlines() if line.startswith("bids_adhd: error:")]
    assert len(errors) == 1 and "Traceback" not in err          # one line, no traceback
    assert str(weights_env / "cache" / "ct-fm" / "model.safetensors") in errors[0]
    assert time.monotonic() - t0 < 30


def test_fetch_model_real_hub_client_offline_error_exits_66(weights_env, monkeypatch, capsys):
    """Past our quick reachability probe, the library's own offline error is mapped to 66 too."""
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(fd, "_hub_unreachable", lambda: None)
    assert cli.main(["fetch-model", "ct-fm"]) == 66
    err = capsys.readouterr().err
    assert "could not download" in err and str(weights_env / "cache" / "ct-fm" / "model.safetensors") in err


def test_fetch_model_network_error_exits_66(weights_env, monkeypatch, capsys):
    hub = pytest.importorskip("huggingface_hub")

    def unreachable(**kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")
    monkeypatch.setattr(hub, "hf_hub_download", unreachable)
    monkeypatch.setattr(fd, "_hub_unreachable", lambda: None)
    assert cli.main(["fetch-model", "ct-fm", "--dest", str(weights_env / "elsewhere")]) == 66
    assert str(weights_env / "elsewhere" / "model.safetensors") in capsys.readouterr().err


def test_fetch_model_downloads_into_the_cache_and_checks_sha256(weights_env, tiny_manifest, monkeypatch, capsys):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_download(repo_id, filename, revision=None, local_dir=None, **kwargs):
        calls.append((repo_id, filename, revision))
        out = fd.Path(local_dir) / filename
        _checkpoint(tiny_manifest, out)
        return str(out)
    monkeypatch.setattr(hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(fd, "_hub_unreachable", lambda: None)
    # fetch-model checks every key and shape of the download against the manifest's architecture
    monkeypatch.setattr(fd, "load_manifest", lambda name: copy.deepcopy(tiny_manifest))
    assert cli.main(["fetch-model", "ct-fm"]) == 0
    target = weights_env / "cache" / "ct-fm" / "model.safetensors"
    assert target.is_file() and calls == [("project-lighter/ct_fm_feature_extractor", "model.safetensors", "main")]
    assert hashlib.sha256(target.read_bytes()).hexdigest() in capsys.readouterr().out
    assert fd.find_weights("ct-fm") == target
    # already there: no second download
    assert cli.main(["fetch-model", "ct-fm"]) == 0 and len(calls) == 1
    # a manifest sha256 that the download does not match: exit 65
    wrong = dict(tiny_manifest, sha256="f" * 64)
    monkeypatch.setattr(fd, "load_manifest", lambda name: wrong)
    assert cli.main(["fetch-model", "ct-fm", "--force"]) == 65
    assert "sha256" in capsys.readouterr().err


def test_manifest_json_is_valid():
    path = fd.models_dir() / "ct-fm.json"
    json.loads(path.read_text())

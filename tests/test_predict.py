"""Inference with a trained adapter: model-file checks, leakage guard, base verification, prediction JSON."""
from __future__ import annotations

import json
import pickle
import types

import pytest
import torch

from bids_adhd import derivatives as dv
from bids_adhd.errors import DataError, MissingInputError, UsageError
from bids_adhd.learn.adapter import read_adapter, save_adapter
from bids_adhd.learn.predict import check_model_file, predict_runs
from bids_adhd.settings import ParticipantSettings
from test_group_common import synthetic, tiny_build_model, tiny_pipeline


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny group run on 8 synthetic subjects; then 2 new subjects' maps (09, 10) in another OUTPUT_DIR."""
    import bids_adhd.learn.classifier as classifier
    from bids_adhd.cli import main

    tmp = tmp_path_factory.mktemp("predict")
    bids, out, _ = synthetic(tmp, n=8)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(classifier, "build_model", tiny_build_model)
        code = main([str(bids), str(out), "group", "--pipeline", str(tiny_pipeline(tmp, epochs=1)), "-q"])
    assert code == 0
    # new subjects: a second synthetic dataset of 10, keep only sub-09 and sub-10
    _, new_out, _ = synthetic(tmp / "new", n=10, seed=5)
    return {"bids": bids, "out": out, "adapter": out / "group" / "final" / "adapter.safetensors",
            "new_out": new_out}


def _args(model, **kw):
    return ParticipantSettings("unused-bids-dir", "unused-output-dir", model=str(model), device="cpu", **kw)


def _runs(*subjects):
    return [types.SimpleNamespace(source=dv.Source(subject=s)) for s in subjects]


@pytest.fixture
def tiny(monkeypatch):
    import bids_adhd.learn.classifier as classifier
    monkeypatch.setattr(classifier, "build_model", tiny_build_model)


def test_check_model_file(trained, tmp_path):
    meta = check_model_file(trained["adapter"])
    assert meta["fold"] == "final" and meta["class_names"] == ["TD", "ADHD"]
    assert meta["base_weights"] == "random-init" and len(meta["train_subjects"]) == 8
    with pytest.raises(MissingInputError):
        check_model_file(tmp_path / "nope.safetensors")
    bad = tmp_path / "model.pt"
    bad.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(DataError, match="not a safetensors"):
        check_model_file(bad)
    from safetensors.torch import save_file
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(DataError, match="not a bids_adhd adapter"):
        check_model_file(plain)


def test_adapter_holds_only_trainable_weights_and_norm_stats(trained, tiny):
    tensors, meta = read_adapter(trained["adapter"])
    model, _ = tiny_build_model(__import__("bids_adhd.config", fromlist=["x"]).load_pipeline("fast").model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable <= set(tensors)
    assert not frozen & set(tensors)
    assert all(k in trainable or "running_" in k or "num_batches" in k for k in tensors)
    for key in ("encoder_fingerprint", "model_id", "pipeline", "train_subjects", "init_seed", "grid"):
        assert meta[key] not in (None, "")


def test_predict_new_subjects(trained, tiny):
    runs = _runs("09", "10")
    recs = predict_runs(_args(trained["adapter"]), runs, trained["new_out"])
    for r, rec in zip(runs, recs):
        path = dv.prediction_json(trained["new_out"], r.source)
        assert path.name == f"sub-{r.source.subject}_desc-adhd_prediction.json"
        saved = json.loads(path.read_text())
        assert 0.0 <= saved["probability"] <= 1.0
        assert saved["label"] == ("ADHD" if saved["probability"] >= saved["threshold"] else "TD")
        assert saved["model_id"] == check_model_file(trained["adapter"])["model_id"]
        assert saved["pretrained"] is False and "warning" in saved
    # same input, same model: same probability (deterministic rebuild)
    again = predict_runs(_args(trained["adapter"]), runs[:1], trained["new_out"])
    assert again[0]["probability"] == pytest.approx(recs[0]["probability"], abs=1e-6)


def test_leakage_guard(trained, tiny):
    with pytest.raises(UsageError, match="sub-01.*--allow-training-subjects"):
        predict_runs(_args(trained["adapter"]), _runs("01"), trained["out"])
    args = _args(trained["adapter"], allow_training_subjects=True)
    rec = predict_runs(args, _runs("01"), trained["out"])[0]
    assert rec["trained_on_this_subject"] is True


def test_fingerprint_mismatch_is_refused(trained, tiny, tmp_path):
    tensors, meta = read_adapter(trained["adapter"])
    from safetensors.torch import save_file
    raw = {k: (json.dumps(v) if k in ("pipeline", "grid", "train_subjects", "class_names") else str(v))
           for k, v in meta.items()}
    raw["pretrained"] = "false"
    raw["encoder_fingerprint"] = "0" * 64
    bad = tmp_path / "tampered.safetensors"
    save_file(tensors, str(bad), metadata=raw)
    with pytest.raises(DataError, match="fingerprint"):
        predict_runs(_args(bad), _runs("09"), trained["new_out"])


def test_other_grid_is_resampled(trained, tiny, tmp_path, caplog):
    """Maps from a participant run on the 2 mm grid are resampled to the model's 6 mm grid."""
    from bids_adhd.config import load_pipeline
    from bids_adhd.simulate_maps import write_synthetic_maps

    out = tmp_path / "out2mm"
    write_synthetic_maps(out, tmp_path / "b2", n_subjects=10, seed=5, template_cfg=load_pipeline("paper").template)
    with caplog.at_level("WARNING", logger="bids_adhd.predict"):
        rec = predict_runs(_args(trained["adapter"]), _runs("09"), out)[0]
    assert rec["resampled_to_model_grid"] is True
    assert any("resampling" in r.message for r in caplog.records)


def test_fold_adapter_through_the_cli_reproduces_the_folds_predictions(trained, tiny, tmp_path, monkeypatch):
    """Item 7 of issue 13: a fold's adapter, applied by ``participant --model`` (dispatched by cli.py
    after the participant workflow) to that fold's test subjects, gives the calibrated probabilities
    of the fold's predictions.tsv. The participant workflow itself is replaced by a no-op here (the
    template-space maps are already in OUTPUT_DIR; the workflow has its own tests); the subjects'
    raw DWI files exist so that the real run selection (pybids) picks them."""
    import shutil

    import bids_adhd.workflows.run as run_mod
    from bids_adhd.cli import main
    from helpers import tensor_signal, write_dwi

    fold = trained["out"] / "group" / "fold-1"
    rows = [ln.split("\t") for ln in (fold / "predictions.tsv").read_text().splitlines()]
    head, rows = rows[0], rows[1:]
    expected = {r[0][4:]: float(r[head.index("probability")]) for r in rows}
    raw = {r[0][4:]: float(r[head.index("probability_uncalibrated")]) for r in rows}
    bids = tmp_path / "bids"
    shutil.copytree(trained["bids"], bids)
    for s in expected:
        write_dwi(bids / f"sub-{s}" / "dwi", f"sub-{s}_dwi", *tensor_signal())
    called = []
    monkeypatch.setattr(run_mod, "run_participant", lambda args: called.append(args) or 0)
    code = main([str(bids), str(trained["out"]), "participant", "--participant-label", *expected,
                 "--model", str(fold / "adapter.safetensors"), "--skip-bids-validation", "-q"])
    assert code == 0 and len(called) == 1
    meta = check_model_file(fold / "adapter.safetensors")
    for s, p in expected.items():
        rec = json.loads(dv.prediction_json(trained["out"], dv.Source(subject=s)).read_text())
        assert rec["probability"] == pytest.approx(p, abs=1e-5)
        assert rec["probability_uncalibrated"] == pytest.approx(raw[s], abs=1e-5)
        assert rec["calibrated"] is True and rec["threshold"] == pytest.approx(meta["threshold"])
        assert rec["label"] == ("ADHD" if p >= meta["threshold"] else "TD")
    assert any(abs(expected[s] - raw[s]) > 1e-6 for s in expected)      # the calibration did something

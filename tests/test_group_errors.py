"""Bad group-level input: one line on stderr, the BIDS-Apps exit code, nothing trained."""
from __future__ import annotations

import pytest

from bids_adhd.cli import main
from test_group_common import patch_tiny, synthetic, tiny_pipeline


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    return synthetic(tmp_path_factory.mktemp("grp_err"), n=8)


def _run(capsys, bids, out, *extra):
    code = main([str(bids), str(out), "group", "-q", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def _rewrite_participants(bids, text):
    (bids / "participants.tsv").write_text(text)


def test_no_label_column_is_65(maps, capsys, monkeypatch):
    patch_tiny(monkeypatch)
    bids, out, _ = maps
    code, err = _run(capsys, bids, out, "--label-column", "dx")
    assert code == 65 and len(err) == 1
    assert "no column 'dx'" in err[0] and "--label-column" in err[0] and "diagnosis" in err[0]


def test_one_class_only_is_65(tmp_path, capsys, monkeypatch):
    patch_tiny(monkeypatch)
    bids, out, rows = synthetic(tmp_path, n=6)
    _rewrite_participants(bids, "participant_id\tdiagnosis\n" + "".join(f"{r['participant_id']}\tTD\n" for r in rows))
    code, err = _run(capsys, bids, out)
    assert code == 65 and len(err) == 1 and "one class only" in err[0]
    # a wrong --positive value is the same error, with the values found
    bids2, out2, _ = synthetic(tmp_path / "b", n=6)
    code, err = _run(capsys, bids2, out2, "--positive", "adhd")
    assert code == 65 and len(err) == 1 and "--positive" in err[0] and "ADHD" in err[0]


def test_too_few_per_class_for_folds_is_65(maps, capsys, monkeypatch):
    patch_tiny(monkeypatch)
    bids, out, _ = maps                                   # 4 ADHD + 4 TD
    code, err = _run(capsys, bids, out, "--folds", "5")
    assert code == 65 and len(err) == 1 and "lower --folds" in err[0]


def test_missing_maps_is_66_and_names_subjects(tmp_path, capsys, monkeypatch):
    patch_tiny(monkeypatch)
    bids, out, rows = synthetic(tmp_path, n=4)
    (out / "sub-01").rename(tmp_path / "gone")
    for s in ("02", "03", "04"):
        import shutil
        shutil.rmtree(out / f"sub-{s}")
    code, err = _run(capsys, bids, out)
    assert code == 66 and len(err) == 1
    assert "sub-01" in err[0] and "participant" in err[0]
    # OUTPUT_DIR missing altogether
    code, err = _run(capsys, bids, tmp_path / "nowhere")
    assert code == 66 and len(err) == 1 and "participant level" in err[0]


def test_some_maps_missing_proceeds_with_warning(tmp_path, capsys, monkeypatch, caplog):
    """Subjects without maps are listed and left out; the run goes on with the others."""
    patch_tiny(monkeypatch)
    from bids_adhd.learn.group import collect_inputs

    bids, out, rows = synthetic(tmp_path, n=8)
    import shutil
    shutil.rmtree(out / "sub-03")
    (bids / "sub-09").mkdir()                         # in BIDS_DIR, never processed, no label
    with caplog.at_level("WARNING", logger="bids_adhd.group"):
        inputs = collect_inputs(bids, out, "diagnosis", "ADHD", 2)
    assert "03" not in inputs.subjects and len(inputs.subjects) == 7
    assert inputs.missing_maps == ["03", "09"]
    assert any("sub-03" in r.message and "left out" in r.message for r in caplog.records)


def test_bad_weights_file_is_65(maps, tmp_path, capsys):
    """The real build_model: a safetensors file whose keys do not fit the manifest's encoder."""
    import torch
    from safetensors.torch import save_file

    bids, out, _ = maps
    bad = tmp_path / "bad.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(bad))
    code, err = _run(capsys, bids, out, "--pipeline", str(tiny_pipeline(tmp_path)), "--weights", str(bad))
    assert code == 65 and len(err) == 1 and "does not match" in err[0]
    assert not (out / "group" / "folds.tsv").exists()     # nothing written before the model is known good


def test_required_weights_missing_is_66_not_a_random_encoder(maps, tmp_path, capsys, monkeypatch, weights_env):
    """What the container images set: no weights file anywhere must stop the group level, not warn and train."""
    monkeypatch.setenv("BIDS_ADHD_REQUIRE_WEIGHTS", "1")
    bids, out, _ = maps
    code, err = _run(capsys, bids, out, "--pipeline", str(tiny_pipeline(tmp_path)))
    assert code == 66 and len(err) == 1, err
    assert "BIDS_ADHD_REQUIRE_WEIGHTS" in err[0] and "fetch-model ct-fm" in err[0]
    assert not (out / "group" / "folds.tsv").exists()


def test_cuda_without_gpu_is_64(maps, capsys, monkeypatch):
    import torch

    patch_tiny(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bids, out, _ = maps
    code, err = _run(capsys, bids, out, "--device", "cuda")
    assert code == 64 and len(err) == 1 and "CUDA" in err[0]

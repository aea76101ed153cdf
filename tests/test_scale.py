"""Large datasets (issue #15): a participant job indexes and validates only its own subjects.

The proof that an unselected subject is not read: the same broken dataset fails as a whole
(pybids cannot index it, the validator reports errors), and succeeds for a selected healthy
subject. BIDS inheritance from the dataset root still reaches the selected runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bids_adhd.bids import collect_runs, subject_folders
from bids_adhd.cli import main
from helpers import make_tiny_bids, tree_hash


@pytest.fixture
def recorded(monkeypatch):
    """The Nipype run replaced by a recorder: selection, validation and checks run for real."""
    import bids_adhd.workflows.run as run_mod

    seen = []
    monkeypatch.setattr(run_mod, "_run_workflow", lambda args, cfg, bids_dir, out_root, runs, chash:
                        seen.extend(runs))
    return seen


def _break_others(bids: Path) -> None:
    """sub-02: a sidecar that is not JSON (pybids' metadata indexing raises, the validator says
    JSON_INVALID); sub-03: a file that is no BIDS name and an image that is no NIfTI
    (NOT_INCLUDED, NIFTI_HEADER_UNREADABLE); sub-04: an empty folder."""
    (bids / "sub-02" / "dwi" / "sub-02_dwi.json").write_text('{"PhaseEncodingDirection": "j-",')
    (bids / "sub-03" / "dwi" / "notes.txt").write_text("scanner crashed")
    (bids / "sub-03" / "dwi" / "sub-03_acq-x_dwi.nii.gz").write_bytes(b"not a nifti")
    (bids / "sub-04").mkdir()


def _run(capsys, bids: Path, out: Path, *extra) -> tuple[int, str]:
    code = main([str(bids), str(out), "participant", *extra])
    return code, capsys.readouterr().err


def test_broken_unselected_subjects_do_not_stop_a_selected_one(tmp_path, capsys, recorded):
    bids = make_tiny_bids(tmp_path / "bids", subjects=("01", "02", "03"))
    _break_others(bids)
    before = tree_hash(bids)
    # the whole dataset really is broken, for the indexer and for the validator
    code, err = _run(capsys, bids, tmp_path / "all", "--skip-bids-validation")
    assert code == 16 and "sub-02_dwi.json" in err, err
    code, err = _run(capsys, bids, tmp_path / "all")
    assert code == 16 and "BIDS validation failed" in err, err
    assert not recorded
    # ... and a job for sub-01, validated, succeeds and processes sub-01 only
    code, err = _run(capsys, bids, tmp_path / "out", "--participant-label", "01")
    assert code == 0, err
    assert "error" not in err.lower() and "Traceback" not in err
    assert [r.source.prefix for r in recorded] == ["sub-01"]
    assert tree_hash(bids) == before


def test_selected_subject_is_still_validated(tmp_path, capsys, recorded):
    bids = make_tiny_bids(tmp_path / "bids", subjects=("01", "02"))
    (bids / "sub-01" / "dwi" / "sub-01_bogus.nii.gz").write_bytes(b"x")
    code, err = _run(capsys, bids, tmp_path / "out", "--participant-label", "01")
    assert code == 16, err
    assert "subjects 01 and the top-level files" in err and "sub-01_bogus.nii.gz" in err, err
    code, err = _run(capsys, bids, tmp_path / "out", "--participant-label", "02")
    assert code == 0, err
    assert [r.source.prefix for r in recorded] == ["sub-02"]


def test_unknown_label_among_many_subjects_is_18(tmp_path, capsys):
    bids = make_tiny_bids(tmp_path / "bids", subjects=("01",))
    for i in range(2, 13):
        (bids / f"sub-{i:02d}" / "dwi").mkdir(parents=True)
    assert subject_folders(bids) == [f"{i:02d}" for i in range(1, 13)]
    code, err = _run(capsys, bids, tmp_path / "out", "--participant-label", "0", "--skip-bids-validation")
    assert code == 18 and "sub-0 not found" in err and "sub-10 ..." in err, err


def test_root_sidecar_inherited_by_the_selected_subject(tmp_path):
    """A dwi.json at the root applies to every subject's DWI unless a closer sidecar overrides a
    key: the selected run's metadata has both (pybids' inheritance is kept, not re-implemented)."""
    bids = make_tiny_bids(tmp_path / "bids", subjects=("01", "02"))
    (bids / "dwi.json").write_text(json.dumps({"MagneticFieldStrength": 3, "TotalReadoutTime": 0.09}))
    (bids / "sub-02" / "dwi" / "sub-02_dwi.json").write_text("{broken")     # not selected: not read
    (run,) = collect_runs(bids, ["sub-01"])
    assert run.metadata["MagneticFieldStrength"] == 3                       # from the root
    assert run.metadata["TotalReadoutTime"] == 0.05                         # the subject's own wins
    assert run.metadata["PhaseEncodingDirection"] == "j-"


def test_top_level_sidecar_of_unselected_data_is_no_error(tmp_path, capsys, recorded):
    """task-rest_bold.json at the root describes other subjects' BOLD runs: in the view of sub-01
    alone it has no data file, which is not an error of the dataset."""
    bids = make_tiny_bids(tmp_path / "bids", subjects=("01", "02"))
    (bids / "task-rest_bold.json").write_text(json.dumps({"TaskName": "rest", "RepetitionTime": 0.8}))
    func = bids / "sub-02" / "func"
    func.mkdir()
    (bids / "sub-02" / "dwi" / "sub-02_dwi.nii.gz").rename(func / "sub-02_task-rest_bold.nii.gz")
    code, err = _run(capsys, bids, tmp_path / "out", "--participant-label", "01")
    assert code == 0, err
    assert [r.source.prefix for r in recorded] == ["sub-01"]

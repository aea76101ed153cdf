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


# --- the group level reads its inputs per batch ------------------------------------------------

@pytest.fixture(scope="module")
def six_runs(tmp_path_factory):
    from bids_adhd.config import load_pipeline
    from bids_adhd.dmri.template import template_grid
    from bids_adhd.learn.data import find_template_maps
    from bids_adhd.simulate_maps import write_synthetic_maps

    tmp = tmp_path_factory.mktemp("stream")
    cfg = load_pipeline("fast")
    write_synthetic_maps(tmp / "out", tmp / "bids", n_subjects=6, seed=4, template_cfg=cfg.template)
    complete, _ = find_template_maps(tmp / "out")
    return [complete[s][0] for s in sorted(complete)], template_grid(cfg.template)


def test_run_images_cache_is_bounded_and_the_rest_is_read_per_access(six_runs, monkeypatch):
    import torch

    import bids_adhd.learn.data as data

    maps, grid = six_runs
    truth = [torch.from_numpy(data.load_input(m, ("fa", "md"), grid)) for m in maps]
    per_run_mib = 2 * 32 ** 3 * 4 / 2 ** 20
    images = data.RunImages(maps, ("fa", "md"), grid, cache_mib=2.5 * per_run_mib)
    assert images.cache_num == 2 and len(images) == 6
    reads = []
    real = data.load_input
    monkeypatch.setattr(data, "load_input", lambda m, *a, **k: reads.append(m) or real(m, *a, **k))
    for i in (0, 1, 4, 4):
        assert torch.equal(images[i], truth[i])
    assert reads == [maps[4], maps[4]]                       # cached runs are not read again, the others are
    monkeypatch.setenv("BIDS_ADHD_CACHE_MB", "0")
    assert data.RunImages(maps, ("fa",), grid).cache_num == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_loader_and_lazy_sequences_give_the_items_images_in_order(six_runs, workers):
    import torch

    from bids_adhd.learn.data import ItemImages, RunImages, batch_loader, load_input

    maps, grid = six_runs
    images = RunImages(maps, ("fa",), grid, cache_mib=0)
    items = [{"images": images, "index": i, "label": i % 2} for i in range(6)]
    batches = [[5, 0], [3], [1, 2, 4, 1]]
    got = list(batch_loader(items, batches, workers))
    assert [len(b) for b in got] == [2, 1, 4]
    for batch, loaded in zip(batches, got):
        for j, x in zip(batch, loaded):
            assert torch.equal(x, torch.from_numpy(load_input(maps[j], ("fa",), grid)))
    lazy = ItemImages(items)[2:5]
    assert isinstance(lazy, ItemImages) and len(lazy) == 3
    assert torch.equal(torch.stack(list(lazy)), torch.stack([images[2], images[3], images[4]]))

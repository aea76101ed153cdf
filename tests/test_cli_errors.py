"""Bad input at participant level: each case gives a one-line message, the BIDS-Apps
exit code, no traceback, no output left behind, and an untouched input dataset."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_adhd.cli import main
from helpers import files_under, make_tiny_bids, tensor_signal, tree_hash, write_dwi


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def assert_clean_failure(code, err, expected_code, must_contain, out: Path | None = None):
    assert code == expected_code, err
    lines = [ln for ln in err.splitlines() if "bids_adhd: error:" in ln]
    assert len(lines) == 1, err
    assert must_contain.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    if out is not None:
        assert files_under(out) == [], files_under(out)


@pytest.fixture
def tiny(tmp_path):
    return make_tiny_bids(tmp_path / "bids", subjects=("01", "02"))


def _participant(bids, out, *extra):
    return [bids, out, "participant", "--skip-bids-validation", *extra]


def test_missing_bids_dir(tmp_path, capsys):
    code, err = run_cli(_participant(tmp_path / "nope", tmp_path / "out"), capsys)
    assert_clean_failure(code, err, 66, "does not exist", tmp_path / "out")


def test_not_a_bids_dataset(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    before = tree_hash(tmp_path / "plain")
    code, err = run_cli(_participant(tmp_path / "plain", tmp_path / "out"), capsys)
    assert_clean_failure(code, err, 16, "not a BIDS dataset", tmp_path / "out")
    assert tree_hash(tmp_path / "plain") == before


def test_validator_errors_give_16(tiny, tmp_path, capsys):
    (tiny / "sub-01" / "dwi" / "sub-01_bogus.nii.gz").write_bytes(b"x")
    code, err = run_cli([tiny, tmp_path / "out", "participant"], capsys)
    assert_clean_failure(code, err, 16, "BIDS validation failed", tmp_path / "out")


@pytest.mark.parametrize("label", ["99", "sub-99"])
def test_unknown_participant_label(tiny, tmp_path, capsys, label):
    before = tree_hash(tiny)
    code, err = run_cli(_participant(tiny, tmp_path / "out", "--participant-label", label), capsys)
    assert_clean_failure(code, err, 18, "sub-99 not found", tmp_path / "out")
    assert tree_hash(tiny) == before


def test_label_with_path_characters(tiny, tmp_path, capsys):
    code, err = run_cli(_participant(tiny, tmp_path / "out", "--participant_label", "../x"), capsys)
    assert_clean_failure(code, err, 64, "not a BIDS label", tmp_path / "out")


def test_filters_select_nothing(tiny, tmp_path, capsys):
    flt = tmp_path / "filter.json"
    flt.write_text(json.dumps({"dwi": {"acquisition": "nonexistent"}}))
    code, err = run_cli(_participant(tiny, tmp_path / "out", "--bids-filter-file", flt), capsys)
    assert_clean_failure(code, err, 18, "no DWI series selected", tmp_path / "out")


def test_session_selects_nothing(tiny, tmp_path, capsys):
    code, err = run_cli(_participant(tiny, tmp_path / "out", "--session-label", "ses-2"), capsys)
    assert_clean_failure(code, err, 18, "no DWI series selected", tmp_path / "out")


@pytest.mark.parametrize("ext", [".bval", ".bvec"])
def test_dwi_without_btable(tiny, tmp_path, capsys, ext):
    (tiny / "sub-01" / "dwi" / f"sub-01_dwi{ext}").unlink()
    before = tree_hash(tiny)
    code, err = run_cli(_participant(tiny, tmp_path / "out"), capsys)
    assert_clean_failure(code, err, 66, ext, tmp_path / "out")
    assert tree_hash(tiny) == before


def _rewrite_btable(tiny, bvals=None, bvecs=None):
    folder = tiny / "sub-01" / "dwi"
    if bvals is not None:
        np.savetxt(folder / "sub-01_dwi.bval", np.asarray(bvals)[None], fmt="%g")
    if bvecs is not None:
        np.savetxt(folder / "sub-01_dwi.bvec", np.asarray(bvecs), fmt="%.6f")


def _table(n_b0=2, n_dirs=12):
    _, bvals, bvecs, _ = tensor_signal(n_dirs=n_dirs, n_b0=n_b0)
    return bvals, bvecs.T


@pytest.mark.parametrize("case, expect", [
    ("fewer_bvals", "has 13 b-values but the image has 14 volumes"),
    ("more_bvecs", "b-vectors but the image has 14 volumes"),
    ("zero_bvecs", "all-zero b-vectors"),
    ("nonunit_bvecs", "not unit length"),
    ("no_b0", "no b=0 volume"),
    ("nan_bvals", "NaN"),
    ("transposed_bvecs", "transposed"),
    ("si_units", "s/m²"),
])
def test_broken_btables(tiny, tmp_path, capsys, case, expect):
    bvals, bvecs = _table()
    if case == "fewer_bvals":
        _rewrite_btable(tiny, bvals=bvals[:-1])
    elif case == "more_bvecs":
        _rewrite_btable(tiny, bvecs=np.hstack([bvecs, bvecs[:, -1:]]))
    elif case == "zero_bvecs":
        bvecs[:, 2:] = 0
        _rewrite_btable(tiny, bvecs=bvecs)
    elif case == "nonunit_bvecs":
        bvecs[:, 2:] *= 2
        _rewrite_btable(tiny, bvecs=bvecs)
    elif case == "no_b0":
        _rewrite_btable(tiny, bvals=np.where(bvals == 0, 500, bvals))
    elif case == "nan_bvals":
        folder = tiny / "sub-01" / "dwi"
        (folder / "sub-01_dwi.bval").write_text(" ".join(["0", "nan"] + ["1000"] * 12) + "\n")
    elif case == "transposed_bvecs":
        _rewrite_btable(tiny, bvecs=bvecs.T)
    elif case == "si_units":
        _rewrite_btable(tiny, bvals=bvals * 1e6)
    before = tree_hash(tiny)
    code, err = run_cli(_participant(tiny, tmp_path / "out"), capsys)
    assert_clean_failure(code, err, 65, expect, tmp_path / "out")
    assert tree_hash(tiny) == before


def test_3d_image(tiny, tmp_path, capsys):
    p = tiny / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    img = nib.load(str(p))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine), str(p))
    code, err = run_cli(_participant(tiny, tmp_path / "out"), capsys)
    assert_clean_failure(code, err, 65, "is 3D", tmp_path / "out")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_voxels(tiny, tmp_path, capsys, bad):
    p = tiny / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    img = nib.load(str(p))
    data = img.get_fdata(dtype=np.float32)
    data[3, 3, 3, 4] = bad
    nib.save(nib.Nifti1Image(data, img.affine), str(p))
    code, err = run_cli(_participant(tiny, tmp_path / "out"), capsys)
    assert_clean_failure(code, err, 65, "NaN/Inf", tmp_path / "out")


def test_truncated_gzip(tiny, tmp_path, capsys):
    p = tiny / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    blob = p.read_bytes()
    p.write_bytes(blob[: len(blob) // 2])
    before = tree_hash(tiny)
    code, err = run_cli(_participant(tiny, tmp_path / "out"), capsys)
    assert_clean_failure(code, err, 65, "sub-01_dwi.nii.gz", tmp_path / "out")
    assert tree_hash(tiny) == before


def test_not_nifti_under_nifti_name(tiny, tmp_path, capsys):
    p = tiny / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    p.write_bytes(gzip.compress(b"this is not an image" * 10))
    code, err = run_cli(_participant(tiny, tmp_path / "out"), capsys)
    assert_clean_failure(code, err, 65, "not a readable NIfTI", tmp_path / "out")


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_in_raw_data(tiny, capsys, where):
    out = tiny if where == "same" else tiny / "sub-01" / "out"
    before = tree_hash(tiny)
    code, err = run_cli(_participant(tiny, out), capsys)
    assert_clean_failure(code, err, 64, "inside BIDS_DIR")
    assert tree_hash(tiny) == before


def test_output_not_creatable(tiny, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    code, err = run_cli(_participant(tiny, blocker / "out"), capsys)
    assert_clean_failure(code, err, 73, "not a directory")


def test_output_not_writable(tiny, tmp_path, capsys, monkeypatch):
    # Tests run as root, for whom permission bits do not bind; emulate the kernel's answer.
    import bids_adhd.bids as bids_mod

    out = tmp_path / "ro"
    out.mkdir()
    real = bids_mod.os.access
    monkeypatch.setattr(bids_mod.os, "access", lambda p, mode: False if Path(p) == out else real(p, mode))
    code, err = run_cli(_participant(tiny, out), capsys)
    assert_clean_failure(code, err, 73, "not writable", out)


def test_unknown_analysis_level(tiny, tmp_path, capsys):
    code, err = run_cli([tiny, tmp_path / "out", "banana"], capsys)
    assert_clean_failure(code, err, 64, "invalid choice", tmp_path / "out")


def test_impossible_options(tiny, tmp_path, capsys):
    code, err = run_cli(_participant(tiny, tmp_path / "out", "--nprocs", "0"), capsys)
    assert_clean_failure(code, err, 64, "--nprocs", tmp_path / "out")
    code, err = run_cli(_participant(tiny, tmp_path / "out", "--pipeline", "nonexistent"), capsys)
    assert_clean_failure(code, err, 64, "unknown pipeline", tmp_path / "out")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: fast\ntemplate:\n  registration_mm: 0\n")
    code, err = run_cli(_participant(tiny, tmp_path / "out", "--pipeline", bad), capsys)
    assert_clean_failure(code, err, 64, "registration_mm must be positive", tmp_path / "out")
    for body, msg in (("preproc:\n  denoise_stride: 6\n", "denoise_stride must be between 1 and"),
                      ("preproc:\n  denoise_stride: two\n", "invalid literal"),
                      ("preproc:\n  motion_min_samples: 10\n", "motion_min_samples must be at least"),
                      ("preproc:\n  motion_head_margin: -2\n", "motion_head_margin must be null or between"),
                      ("preproc:\n  motion_eddy_model: quadratic\n", "motion_eddy_model must be one of linear, none"),
                      ("model:\n  feature_levels: [3, 3]\n", "feature_levels must be distinct")):
        bad.write_text("base: fast\n" + body)
        code, err = run_cli(_participant(tiny, tmp_path / "out", "--pipeline", bad), capsys)
        assert_clean_failure(code, err, 64, msg, tmp_path / "out")


def test_console_script_exit_code_and_stderr(tmp_path):
    """The installed entry point, as a user runs it: exit code and one stderr line."""
    proc = subprocess.run([sys.executable, "-m", "bids_adhd", str(tmp_path / "missing"), str(tmp_path / "o"),
                           "participant"], capture_output=True, text=True)
    assert proc.returncode == 66
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("bids_adhd: error:")
    assert "Traceback" not in proc.stderr


def test_version_and_help():
    proc = subprocess.run([sys.executable, "-m", "bids_adhd", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "bids_adhd" in proc.stdout

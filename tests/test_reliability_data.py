"""Bad and unusual input data at the participant level (extends test_cli_errors.py).

Every refused case: the BIDS-Apps exit code, exactly one ``bids_adhd: error:`` line naming the
file and what is wrong, no traceback, nothing written under OUTPUT_DIR, and the input dataset
byte-identical afterwards. Every accepted case: selected and checked without error (the Nipype
workflow itself is stubbed out here; ``test_security.py`` runs oblique, two-grid and unicode-path
data through the real workflow). The table of all cases is docs/reliability.md.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_adhd.cli import main
from helpers import files_under, make_tiny_bids, tensor_signal, tree_hash, write_dwi


# --- helpers --------------------------------------------------------------------------------

@pytest.fixture
def tiny(tmp_path):
    return make_tiny_bids(tmp_path / "bids", subjects=("01", "02"))


def dwi_of(bids: Path, sub="01") -> Path:
    return bids / f"sub-{sub}" / "dwi" / f"sub-{sub}_dwi.nii.gz"


def participant(bids, out, *extra):
    return [str(bids), str(out), "participant", "--skip-bids-validation", *map(str, extra)]


def refused(capsys, bids: Path, code: int, *needles: str, extra=(), out: Path | None = None):
    """Run the participant level on a broken dataset and check the clean failure."""
    out = out or bids.parent / "out"
    before = tree_hash(bids) if bids.is_dir() else None
    got = main(participant(bids, out, *extra))
    err = capsys.readouterr().err
    assert got == code, err
    lines = [ln for ln in err.splitlines() if ln.startswith("bids_adhd: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    assert files_under(out) == [], files_under(out)
    if before is not None:
        assert tree_hash(bids) == before
    return lines[0]


@pytest.fixture
def stub_workflow(monkeypatch):
    """Replace the Nipype run by a recorder: the input side runs for real, nothing is processed."""
    import bids_adhd.workflows.run as run_mod

    seen = []
    monkeypatch.setattr(run_mod, "_run_workflow", lambda args, cfg, bids_dir, out_root, runs, chash:
                        seen.extend(runs))
    return seen


def accepted(capsys, stub_workflow, bids: Path, *extra, out: Path | None = None):
    out = out or bids.parent / "out"
    before = tree_hash(bids)
    code = main(participant(bids, out, *extra))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err and "error:" not in err
    assert tree_hash(bids) == before
    return stub_workflow, err


def raw_nifti(path: Path, shape, *, dtype=np.float32, srow=None, zooms=None, payload: bytes = b"",
              compress=True) -> Path:
    """A NIfTI-1 file written byte by byte: any header, any (possibly short) data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_xyzt_units("mm", "sec")
    srow = np.diag([2.0, 2.0, 2.0, 1.0])[:3] if srow is None else np.asarray(srow, float)
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = srow
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    pix = np.ones(8, np.float32)
    pix[1:4] = zooms if zooms is not None else (2.0, 2.0, 2.0)
    hdr["pixdim"] = pix
    hdr["vox_offset"] = 352
    bio = io.BytesIO()
    hdr.write_to(bio)
    blob = bio.getvalue().ljust(352, b"\0") + payload
    path.write_bytes(gzip.compress(blob, mtime=0) if compress else blob)
    return path


def rewrite_image(bids: Path, fn, sub="01"):
    """Replace sub's DWI by fn(data, affine) -> (data, affine)."""
    p = dwi_of(bids, sub)
    img = nib.load(str(p))
    data, affine = fn(np.asarray(img.dataobj), img.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), str(p))


def write_btable(bids: Path, bvals=None, bvec_text=None, bval_text=None, bvecs=None, sub="01"):
    folder = bids / f"sub-{sub}" / "dwi"
    if bvals is not None:
        np.savetxt(folder / f"sub-{sub}_dwi.bval", np.asarray(bvals, float)[None], fmt="%g")
    if bval_text is not None:
        (folder / f"sub-{sub}_dwi.bval").write_text(bval_text)
    if bvecs is not None:
        np.savetxt(folder / f"sub-{sub}_dwi.bvec", np.asarray(bvecs, float), fmt="%.6f")
    if bvec_text is not None:
        (folder / f"sub-{sub}_dwi.bvec").write_text(bvec_text)


def rename_subject(bids: Path, old: str, new: str):
    os.rename(bids / f"sub-{old}", bids / f"sub-{new}")
    for f in (bids / f"sub-{new}" / "dwi").iterdir():
        os.rename(f, f.with_name(f.name.replace(f"sub-{old}", f"sub-{new}")))


# --- the dataset as a whole ------------------------------------------------------------------

@pytest.mark.parametrize("content, needle", [
    (b"", "not valid JSON"),
    (b"\xff\xfe{\x00", "not valid JSON"),
    (b'{"Name": "x"}', "must hold 'Name' and 'BIDSVersion'"),
    (b'["Name", "BIDSVersion"]', "must hold"),
], ids=["empty", "not-utf8", "no-BIDSVersion", "json-array"])
def test_bad_dataset_description(tiny, capsys, content, needle):
    (tiny / "dataset_description.json").write_bytes(content)
    refused(capsys, tiny, 16, "dataset_description.json", needle)


def test_bids_dir_is_a_file(tmp_path, capsys):
    f = tmp_path / "data.nii.gz"
    f.write_bytes(b"x")
    got = main(participant(f, tmp_path / "out"))
    err = capsys.readouterr().err
    assert got == 64 and "is not a directory" in err and "Traceback" not in err
    assert files_under(tmp_path / "out") == []


def test_no_subject_folders(tiny, capsys):
    for sub in ("01", "02"):
        shutil.rmtree(tiny / f"sub-{sub}")
    refused(capsys, tiny, 18, "holds no sub-* folders")


def test_subjects_without_dwi(tiny, capsys):
    for sub in ("01", "02"):
        anat = tiny / f"sub-{sub}" / "anat"
        anat.mkdir()
        shutil.move(str(dwi_of(tiny, sub)), anat / f"sub-{sub}_T1w.nii.gz")
        shutil.rmtree(tiny / f"sub-{sub}" / "dwi")
    refused(capsys, tiny, 18, "no DWI series selected")


def test_sidecar_json_does_not_parse(tiny, capsys):
    (tiny / "sub-01" / "dwi" / "sub-01_dwi.json").write_text('{"PhaseEncodingDirection": "j-",')
    # pybids cannot index the dataset: a validation failure (the validator says JSON_INVALID)
    refused(capsys, tiny, 16, "sub-01_dwi.json", "decode JSON")


# --- participants.tsv at the participant level: warnings, never errors -------------------------

@pytest.mark.parametrize("table, warning", [
    ("participant_id\tdiagnosis\nsub-01\tTD\nsub-02\tADHD\nsub-01\tTD\n", "lists sub-01 twice"),
    ("participant_id\tdiagnosis\nsub-01\tTD\n", "no row for sub-02"),
    ("participant_id\tdiagnosis\nsub-01\tTD\nsub-02\tADHD\nsub-09\tTD\n", "lists sub-09 without a sub-*"),
    (None, "participants.tsv is missing"),
    ("subject\tdiagnosis\nsub-01\tTD\n", "no participant_id column"),
], ids=["duplicate", "missing-subject", "extra-subject", "no-file", "no-id-column"])
def test_participants_tsv_problems_warn_at_participant_level(tiny, capsys, stub_workflow, table, warning):
    path = tiny / "participants.tsv"
    if table is None:
        path.unlink()
    else:
        path.write_text(table)
    runs, err = accepted(capsys, stub_workflow, tiny)
    assert [r.source.subject for r in runs] == ["01", "02"]
    assert warning in err


def test_participants_tsv_duplicate_is_65_at_group_level(tiny, tmp_path, capsys):
    (tiny / "participants.tsv").write_text("participant_id\tdiagnosis\nsub-01\tTD\nsub-02\tADHD\nsub-01\tTD\n")
    out = tmp_path / "out"
    out.mkdir()
    before = tree_hash(tiny)
    code = main([str(tiny), str(out), "group", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 65, err
    assert "participants.tsv lists sub-01 twice" in err and "Traceback" not in err
    assert files_under(out) == [] and tree_hash(tiny) == before


# --- b-tables (beyond test_cli_errors.py) ---------------------------------------------------------

def test_b0_only(tiny, capsys):
    write_btable(tiny, bvals=np.zeros(14), bvecs=np.zeros((3, 14)))
    refused(capsys, tiny, 65, "sub-01_dwi.bval", "only b=0")


def test_negative_bvalues(tiny, capsys):
    write_btable(tiny, bvals=[0, 0] + [1000] * 11 + [-1000])
    refused(capsys, tiny, 65, "sub-01_dwi.bval", "negative")


def test_bvals_as_a_matrix(tiny, capsys):
    write_btable(tiny, bval_text="0 0 1000 1000 1000 1000 1000\n1000 1000 1000 1000 1000 1000 1000\n")
    refused(capsys, tiny, 65, "sub-01_dwi.bval", "one row")


def test_bvecs_not_numbers(tiny, capsys):
    write_btable(tiny, bvec_text="x y z\n" * 3)
    refused(capsys, tiny, 65, "sub-01_dwi.bvec", "not a table of numbers")


def test_empty_bval_file(tiny, capsys):
    write_btable(tiny, bval_text="\n")
    refused(capsys, tiny, 65, "sub-01_dwi.bval", "is empty")


def test_bvecs_with_four_rows(tiny, capsys):
    _, _, bvecs, _ = tensor_signal()
    write_btable(tiny, bvecs=np.vstack([bvecs.T, np.ones(14)]))
    refused(capsys, tiny, 65, "sub-01_dwi.bvec", "4 rows, expected 3")


def test_too_few_directions_for_a_tensor(tmp_path, capsys):
    bids = make_tiny_bids(tmp_path / "bids", n_dirs=5, n_b0=2)   # 7 volumes, 5 directions
    refused(capsys, bids, 65, "sub-01_dwi.bval", "5 diffusion-weighted volumes", "≥ 6")


# --- images ---------------------------------------------------------------------------------------

def test_5d_image(tiny, capsys):
    rewrite_image(tiny, lambda d, a: (d[..., None].repeat(2, axis=4), a))
    refused(capsys, tiny, 65, "sub-01_dwi.nii.gz", "is 5D")


def test_too_few_volumes(tmp_path, capsys):
    bids = make_tiny_bids(tmp_path / "bids", n_dirs=3, n_b0=2)
    refused(capsys, bids, 65, "sub-01_dwi.nii.gz", "only 5 volumes")


def test_spatial_dimension_too_small(tmp_path, capsys):
    bids = make_tiny_bids(tmp_path / "bids", shape=(10, 10, 3))
    refused(capsys, bids, 65, "sub-01_dwi.nii.gz", "below 4 voxels")


def test_zero_size_image(tiny, capsys):
    dwi_of(tiny).write_bytes(b"")
    refused(capsys, tiny, 65, "sub-01_dwi.nii.gz", "empty file")


def test_gzip_intact_but_data_missing(tiny, capsys):
    """A complete gzip stream whose NIfTI holds only half its voxels (an interrupted copy
    that was re-compressed, or a header from another file)."""
    p = dwi_of(tiny)
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[: 352 + (len(raw) - 352) // 2]))
    refused(capsys, tiny, 65, "sub-01_dwi.nii.gz", "cannot be read completely")


def test_uncompressed_nifti_truncated(tiny, capsys):
    folder = tiny / "sub-01" / "dwi"
    p = dwi_of(tiny)
    raw = gzip.decompress(p.read_bytes())
    p.unlink()
    (folder / "sub-01_dwi.nii").write_bytes(raw[: len(raw) - 1000])
    refused(capsys, tiny, 65, "sub-01_dwi.nii", "truncated")


@pytest.mark.parametrize("srow, needle", [
    (np.zeros((3, 4)), "non-invertible"),
    (np.array([[np.nan, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0]]), "non-finite"),
], ids=["singular", "nan"])
def test_bad_affine(tiny, capsys, srow, needle):
    data = np.asarray(nib.load(str(dwi_of(tiny))).dataobj, dtype=np.float32)
    raw_nifti(dwi_of(tiny), data.shape, srow=srow, payload=data.tobytes(order="F"))
    refused(capsys, tiny, 65, "sub-01_dwi.nii.gz", needle)


def test_extremely_anisotropic_voxels(tiny, capsys):
    rewrite_image(tiny, lambda d, a: (d, np.diag([1.0, 1.0, 8.0, 1.0])))
    refused(capsys, tiny, 65, "sub-01_dwi.nii.gz", "too anisotropic")


_MEMORY_PROBE = textwrap.dedent("""
    import json, sys, time
    from bids_adhd.cli import main
    runs = []
    for bids in sys.argv[2:]:
        t0 = time.perf_counter()
        runs.append([main([bids, sys.argv[1], "participant", "--skip-bids-validation"]),
                     time.perf_counter() - t0])
    # VmHWM is this process image's own peak; ru_maxrss would carry over the peak of the
    # (large) pytest process this one was forked from.
    hwm = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    print(json.dumps({"runs": runs, "maxrss_mb": hwm // 1024}))
""")


def test_huge_header_dimensions_fail_fast_in_little_memory(tmp_path):
    """Tiny .nii.gz files whose headers claim 4096³×300 float32 (80 TB; beyond the element cap)
    and 512³×7 int16 (1.9 GB; under the cap, but 20 million times the file): both refused in a
    second, and the process never grows (nibabel would allocate the claimed array, then find the
    data short: that used to take 1.8 GB and 11 s for the second file)."""
    sets = []
    for name, shape, dtype in (("cap", (4096, 4096, 4096, 300), np.float32),
                               ("claim", (512, 512, 512, 7), np.int16)):
        bids = make_tiny_bids(tmp_path / name / "bids")
        raw_nifti(dwi_of(bids), shape, dtype=dtype, payload=b"\0" * 4096)
        sets.append((bids, tree_hash(bids)))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(out)] + [str(b) for b, _ in sets],
                          capture_output=True, text=True, timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [code for code, _ in result["runs"]] == [65, 65], proc.stderr
    assert all(sec < 15 for _, sec in result["runs"]), result
    assert result["maxrss_mb"] < 600, f"peak RSS {result['maxrss_mb']} MB"
    errs = [ln for ln in proc.stderr.splitlines() if ln.startswith("bids_adhd: error:")]
    assert len(errs) == 2 and "Traceback" not in proc.stderr
    assert "beyond what a DWI series can be" in errs[0]
    assert "sub-01_dwi.nii.gz header claims shape (512, 512, 512, 7)" in errs[1]
    assert files_under(out) == []
    assert all(tree_hash(b) == h for b, h in sets)


# --- names, paths, links ----------------------------------------------------------------------------

@pytest.mark.parametrize("new, needle", [
    ("café", "'sub-café' is not a valid BIDS entity"),      # pybids would call it 'caf'
    ("ü", "no valid 'sub-<label>' entity"),                # pybids would find no subject at all
], ids=["partly-non-ascii", "non-ascii"])
def test_non_ascii_subject_label(tiny, capsys, new, needle):
    rename_subject(tiny, "02", new)
    refused(capsys, tiny, 65, needle)


def test_entity_pybids_would_misread(tiny, capsys):
    folder = tiny / "sub-01" / "dwi"
    for f in list(folder.iterdir()):
        f.rename(f.with_name(f.name.replace("sub-01_", "sub-01_run-1b_")))
    # pybids parses run-1b as run 1: derivatives would be named run-1 and could collide
    refused(capsys, tiny, 65, "sub-01_run-1b_dwi.nii.gz", "'run-1b' is not a valid BIDS entity")


def test_other_subjects_bad_names_do_not_block_a_selected_one(tiny, capsys, stub_workflow):
    rename_subject(tiny, "02", "café")
    runs, _ = accepted(capsys, stub_workflow, tiny, "--participant-label", "01")
    assert [r.source.prefix for r in runs] == ["sub-01"]


@pytest.mark.parametrize("option, value", [("--participant-label", "café"), ("--session-label", "../x"),
                                           ("--session-label", "ses-a/b")])
def test_labels_with_unicode_or_path_characters(tiny, capsys, option, value):
    refused(capsys, tiny, 64, "not a BIDS label", extra=(option, value))


def test_unicode_and_spaces_in_paths(tmp_path, capsys, stub_workflow):
    bids = make_tiny_bids(tmp_path / "données brutes ü" / "bids")
    runs, _ = accepted(capsys, stub_workflow, bids, out=tmp_path / "sortie é")
    assert [r.source.prefix for r in runs] == ["sub-01"] and str(runs[0].dwi).startswith(str(bids))


def test_symlink_to_a_file_outside_the_dataset_is_followed(tiny, tmp_path, capsys, stub_workflow):
    """Decision: input symlinks are the user's own data (DataLad/git-annex datasets are made of
    them) and are followed; nothing is ever written through them (the input stays read only)."""
    store = tmp_path / "elsewhere"
    store.mkdir()
    for ext in (".nii.gz", ".bval", ".bvec"):
        p = tiny / "sub-01" / "dwi" / f"sub-01_dwi{ext}"
        shutil.move(str(p), store / p.name)
        p.symlink_to(store / p.name)
    before_store = tree_hash(store)
    runs, _ = accepted(capsys, stub_workflow, tiny)
    assert [r.source.prefix for r in runs] == ["sub-01", "sub-02"]
    assert tree_hash(store) == before_store


def test_dangling_symlink(tiny, tmp_path, capsys):
    p = dwi_of(tiny)
    p.unlink()
    p.symlink_to(tmp_path / "annex" / "MD5E-s123--abc.nii.gz")
    refused(capsys, tiny, 66, "sub-01_dwi.nii.gz", "symbolic link", "does not exist")


# --- geometry that must work ----------------------------------------------------------------------------

def _oblique(affine):
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    out = affine.copy()
    out[:3, :3] = rot @ affine[:3, :3]
    return out


def test_oblique_affine_is_accepted(tiny, capsys, stub_workflow):
    """Decision: oblique acquisitions are normal (tilted slabs); DIPY works in world
    coordinates, so the series is processed in its own (oblique) grid and registered to the
    template as any other. test_security.py runs one through the whole workflow."""
    rewrite_image(tiny, lambda d, a: (d, _oblique(a)))
    runs, _ = accepted(capsys, stub_workflow, tiny)
    assert len(runs) == 2


def test_two_runs_with_different_grids(tiny, capsys, stub_workflow):
    """Decision: each run is its own series with its own nodes and outputs; grids are never mixed."""
    folder = tiny / "sub-01" / "dwi"
    for f in list(folder.iterdir()):
        f.rename(f.with_name(f.name.replace("sub-01_", "sub-01_run-1_")))
    data, bvals, bvecs, _ = tensor_signal(shape=(12, 11, 9), seed=5)
    write_dwi(folder, "sub-01_run-2_dwi", data, bvals, bvecs, np.diag([2.5, 2.5, 3.0, 1.0]))
    runs, err = accepted(capsys, stub_workflow, tiny, "--participant-label", "01")
    assert [r.source.prefix for r in runs] == ["sub-01_run-1", "sub-01_run-2"]
    assert "(10, 10, 8, 14)" in err and "(12, 11, 9, 14)" in err

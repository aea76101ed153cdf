"""derivatives.write_nifti / copy_nifti: what the sink publishes from the uncompressed work dir."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np

from bids_adhd import derivatives as dv


def _img(dtype=np.float32):
    data = np.random.default_rng(0).normal(size=(9, 8, 7, 3)).astype(dtype)
    aff = np.diag([2.5, 2.5, 2.5, 1.0])
    aff[:3, 3] = [-10, 4, 7]
    return nib.Nifti1Image(data, aff), data


def test_write_nifti_gz_is_fast_level_reproducible_and_exact(tmp_path):
    img, data = _img()
    a, b = dv.write_nifti(tmp_path / "a.nii.gz", img), dv.write_nifti(tmp_path / "b.nii.gz", img)
    raw = a.read_bytes()
    assert raw == b.read_bytes()                      # no timestamp in the gzip header
    assert raw[:2] == b"\x1f\x8b" and raw[8] == 4     # gzip; XFL 4 = fastest compression (level 1)
    assert gzip.decompress(raw)[344:348] == b"n+1\0"  # a single-file NIfTI-1 inside
    back = nib.load(a)
    assert np.array_equal(np.asarray(back.dataobj), data) and np.allclose(back.affine, img.affine)
    assert not list(tmp_path.glob(".*"))             # no temporary left


def test_copy_nifti_converts_between_nii_and_nii_gz(tmp_path):
    img, data = _img()
    mask = nib.Nifti1Image((data[..., 0] > 0).astype(np.uint8), img.affine)
    nib.save(img, tmp_path / "work.nii")
    nib.save(mask, tmp_path / "mask.nii")
    out = dv.copy_nifti(tmp_path / "work.nii", tmp_path / "out" / "x_dwi.nii.gz")
    assert out.read_bytes()[:2] == b"\x1f\x8b" and np.array_equal(np.asarray(nib.load(out).dataobj), data)
    m = nib.load(dv.copy_nifti(tmp_path / "mask.nii", tmp_path / "out" / "x_mask.nii.gz"))
    assert m.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(m.dataobj), mask.get_fdata())
    same = dv.copy_nifti(out, tmp_path / "out" / "copy.nii.gz")          # same kind: a byte copy
    assert same.read_bytes() == out.read_bytes()


def test_template_space_outputs_get_xform_code_4(tmp_path):
    """copy_nifti/write_nifti give sform and qform code 4 to a space-MNI152NLin2009aSym name, with the
    same affine and voxels; a native-space name keeps the work file's header (code 1)."""
    img, data = _img()
    img.set_sform(img.affine, code=1)
    img.set_qform(img.affine, code=1)
    work = tmp_path / "work.nii.gz"
    nib.save(img, str(work))
    src = dv.Source(subject="01")
    std = dv.copy_nifti(work, dv.dwimap(tmp_path, src, "fa", space=dv.TEMPLATE_SPACE))
    native = dv.copy_nifti(work, dv.dwimap(tmp_path, src, "fa"))
    out = nib.load(str(std))
    assert (int(out.header["sform_code"]), int(out.header["qform_code"])) == (4, 4)
    assert np.allclose(out.get_sform(), img.affine) and np.allclose(out.get_qform(), img.affine)
    assert np.array_equal(np.asarray(out.dataobj), data)
    assert native.read_bytes() == work.read_bytes()


def test_bidsignore_written_once_and_keeps_user_lines(tmp_path):
    path = dv.ensure_bidsignore(tmp_path)
    assert path.read_text().splitlines() == list(dv.BIDSIGNORE)
    path.write_text("extra/\n" + path.read_text())
    dv.ensure_bidsignore(tmp_path)
    assert path.read_text().splitlines() == ["extra/", *dv.BIDSIGNORE]


def test_stale_bidsignore_temporary_is_removed(tmp_path):
    import os
    import time

    stale, fresh = tmp_path / "..bidsignore.abcd1234.tmp", tmp_path / "..bidsignore.efgh5678.tmp"
    for p in (stale, fresh):
        p.write_text("x")
    os.utime(stale, (time.time() - 120, time.time() - 120))
    assert dv.remove_stale_temps(tmp_path, []) == [stale]          # another job may be writing the fresh one
    assert not stale.exists() and fresh.exists()

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

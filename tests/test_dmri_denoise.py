"""MP-PCA (bids_adhd.dmri.denoise.mppca) against DIPY's reference implementation.

Tolerances, relative to the data range (max - min):
* float64 input (DIPY computes in float64, so do we): max |ours - DIPY| < 1e-6
  (the output is float32, so ~6e-8 is the floor); sigma likewise.
* float32 input (DIPY computes in float32, so do we, with a different LAPACK
  routine): max < 2e-3 and the 99.9th percentile < 1e-5 (a patch whose
  eigenvalue sits within float32 rounding of the threshold can flip; DIPY's
  own float32 and float64 runs differ by the same amount, checked below).
"""
from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_erosion
from threadpoolctl import threadpool_limits

from bids_adhd.dmri.denoise import denoise, mppca

dipy_localpca = pytest.importorskip("dipy.denoise.localpca")


def dipy_mppca(arr, **kw):
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dipy_localpca.mppca(arr, **kw)


@pytest.fixture(scope="module")
def small64d():
    from dipy.data import get_fnames

    fname = get_fnames(name="small_64D")[0]
    return np.asarray(nib.load(fname).dataobj, dtype=np.float64)          # (10, 10, 10, 65)


def lowrank(shape=(11, 10, 9), n=24, rank=3, sigma=0.05, seed=0):
    """Smooth low-rank signal + Gaussian noise (no constant patches)."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(0, 1, s) for s in shape], indexing="ij"), -1)
    maps = np.stack([1 + np.sin(3 * g[..., 0] + k) * np.cos(2 * g[..., 1] - k) + g[..., 2] * k
                     for k in range(rank)], -1)
    basis = rng.normal(size=(rank, n))
    return maps @ basis + 3.0 + sigma * rng.normal(size=shape + (n,))


def rel(a, b, data):
    return np.abs(np.asarray(a, float) - np.asarray(b, float)).max() / np.ptp(data)


def test_equals_dipy_on_real_data_float64(small64d):
    ref, ref_sigma = dipy_mppca(small64d, return_sigma=True)
    out, sigma = mppca(small64d, return_sigma=True)
    assert out.dtype == np.float32 and out.shape == small64d.shape
    assert rel(out, ref, small64d) < 1e-6
    assert np.abs(sigma - ref_sigma).max() / ref_sigma.max() < 1e-6
    assert mppca.last_stats["precision"] == "float64"


def test_equals_dipy_on_synthetic_incl_svd_radius1_and_threads():
    data = lowrank()
    ref = dipy_mppca(data, patch_radius=1)                                # 27 samples > 24 volumes
    out = mppca(data, patch_radius=1)
    assert rel(out, ref, data) < 1e-6
    out2 = mppca(data, patch_radius=1, nprocs=2, slab=1)
    assert np.array_equal(out2, mppca(data, patch_radius=1, slab=1))      # threads do not change bits
    assert rel(out2, ref, data) < 1e-6
    ref_svd = dipy_mppca(data, patch_radius=1, pca_method="svd")
    assert rel(mppca(data, patch_radius=1, pca_method="svd"), ref_svd, data) < 1e-6
    # anisotropic radius, including a 0 radius
    ref_aniso = dipy_mppca(data, patch_radius=[2, 1, 0], suppress_warning=True)
    assert rel(mppca(data, patch_radius=[2, 1, 0], suppress_warning=True), ref_aniso, data) < 1e-6


def test_more_volumes_than_samples_truncates_like_dipy():
    # 27 samples, 40 volumes: DIPY keeps the top 26 eigenvalues for the MP fit
    data = lowrank(shape=(8, 8, 7), n=40, rank=4)
    ref, ref_sigma = dipy_mppca(data, patch_radius=1, return_sigma=True)
    with pytest.warns(UserWarning, match="Dimensionality"):
        out, sigma = mppca(data, patch_radius=1, return_sigma=True)
    assert rel(out, ref, data) < 1e-6
    assert np.abs(sigma - ref_sigma).max() / ref_sigma.max() < 1e-6


def test_masks_roi_and_dipy_modes(small64d):
    mask = np.zeros(small64d.shape[:3], bool)
    mask[3:9, 3:9, 3:9] = True
    mask[0, 0, 0] = True    # corner voxel: no patch centred in the mask covers it (DIPY's mask mode: NaN)
    full = dipy_mppca(small64d)
    ref_m, ref_ms = dipy_mppca(small64d, mask=mask, return_sigma=True)
    roi = mppca(small64d, mask=mask)                     # default: "roi", patches centred in the mask
    covered = mask & ~np.isnan(ref_m).any(-1)
    assert covered.sum() == mask.sum() - 1
    assert rel(roi[covered], ref_m[covered], small64d) < 1e-6              # inside: DIPY's masked result
    core = binary_erosion(mask, np.ones((5, 5, 5)))                         # the mask eroded by the radius
    assert core.sum() > 0 and not np.array_equal(full[mask & ~core], ref_m[mask & ~core])
    assert rel(roi[core], full[core], small64d) < 1e-6                    # there: DIPY's unmasked result
    keep = ~covered                                      # outside and the uncovered corner: the input
    assert np.array_equal(roi[keep], small64d[keep].astype(np.float32))
    with np.errstate(invalid="ignore"):
        out_m, out_ms = mppca(small64d, mask=mask, mask_mode="dipy", return_sigma=True)
    # DIPY: patches centred in the mask only, 0 outside, NaN at a masked voxel no patch covers
    assert np.array_equal(np.isnan(out_m), np.isnan(ref_m)) and np.isnan(ref_m[0, 0, 0]).all()
    ok = ~np.isnan(ref_m)
    assert np.abs(out_m[ok] - ref_m[ok]).max() / np.ptp(small64d) < 1e-6
    ok = ~np.isnan(ref_ms)
    assert np.abs(out_ms[ok] - ref_ms[ok]).max() / np.nanmax(ref_ms) < 1e-6
    assert (out_m[~mask] == 0).all()


def test_float32_input_matches_dipy_float32_within_its_own_float_gap(small64d):
    d32 = small64d.astype(np.float32)
    ref32 = dipy_mppca(d32)
    ref64 = dipy_mppca(small64d)
    out = mppca(d32)
    assert mppca.last_stats["precision"] == "float32"
    diff = np.abs(out - ref32) / np.ptp(small64d)
    assert diff.max() < 2e-3 and np.quantile(diff, 0.999) < 1e-5
    assert np.abs(ref32 - ref64).max() / np.ptp(small64d) < 2e-3     # DIPY's own float gap
    # float64 computation from float32 data gives DIPY's float64 result
    assert rel(mppca(d32, dtype="float64"), ref64, small64d) < 1e-6


def test_float32_gram_path_and_batches_match_dipy_float32():
    # more volumes than patch voxels in float32 (the HBN case, 133 volumes vs
    # 125 voxels): float32 centring, Gram matrix, eigh and projections
    data = (lowrank(shape=(9, 8, 7), n=40, rank=4, sigma=0.3, seed=5) * 100).astype(np.float32)
    ref32 = dipy_mppca(data, patch_radius=1)
    ref64 = dipy_mppca(data.astype(np.float64), patch_radius=1)
    with pytest.warns(UserWarning, match="Dimensionality"):
        out = mppca(data, patch_radius=1)
    assert mppca.last_stats["precision"] == "float32"
    diff = np.abs(out - ref32) / np.ptp(data)
    assert diff.max() < 2e-3 and np.quantile(diff, 0.999) < 1e-5
    assert rel(out, ref64, data) < 2e-3 and np.quantile(np.abs(out - ref64) / np.ptp(data), 0.999) < 1e-5
    # the batch size changes only rounding (a batch's projections are as wide as its largest
    # retained rank; the extra columns are zeros): no decision flips
    for b in (1, 7, 1000):
        assert rel(mppca(data, patch_radius=1, batch=b, suppress_warning=True), out, data) < 1e-6


def test_denoise_dispatch_and_errors(small64d):
    data = small64d[..., :20]
    assert np.array_equal(denoise(data, "none"), data.astype(np.float32))
    assert np.array_equal(denoise(data, "mppca", patch_radius=1), mppca(data, patch_radius=1))
    with pytest.raises(ValueError, match="unknown denoising method"):
        denoise(data, "nlmeans")
    with pytest.raises(ValueError, match="4D"):
        mppca(data[..., 0])
    with pytest.raises(ValueError, match="incorrect shape"):
        mppca(data[:3], patch_radius=2)
    with pytest.raises(ValueError, match="mask shape"):
        mppca(data, mask=np.ones((3, 3, 3), bool))


def test_patch2self_wrapper_matches_dipy():
    from dipy.denoise.patch2self import patch2self as dipy_p2s

    data = np.abs(lowrank(shape=(8, 8, 6), n=12, sigma=0.2, seed=3)) * 100
    bvals = np.r_[0, 0, np.full(10, 1000.0)]
    mask = np.zeros(data.shape[:3], bool)
    mask[2:6, 2:6, 1:5] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.random.seed(7)                      # DIPY's sketching draws from the global generator
        ref = dipy_p2s(data, bvals, model="ols", out_dtype=np.float32)
        state = np.random.get_state()
        out = denoise(data, "patch2self", bvals=bvals, mask=mask, seed=7)
        assert np.array_equal(denoise(data, "patch2self", bvals=bvals, seed=7)[mask], out[mask])
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state()[1:3], state[1:3]))  # restored
    assert np.allclose(out[mask], ref[mask], rtol=1e-5, atol=1e-3)
    assert np.array_equal(out[~mask], data[~mask].astype(np.float32))


def test_stride_covers_every_voxel_and_keeps_most_of_the_denoising():
    """Patch centres on a lattice (the ``fast`` preset's stride 2) against the noise-free truth."""
    shape, n, sigma = (21, 19, 17), 30, 0.15
    clean = lowrank(shape, n, rank=3, sigma=0.0, seed=3)
    clean = clean - clean.min() + 1.0                        # positive, as magnitude data (the output is clipped at 0)
    noisy = (clean + sigma * np.random.default_rng(4).normal(size=clean.shape)).astype(np.float32)
    err = {}
    for s in (1, 2, 3):
        out = mppca(noisy, stride=s)
        assert np.isfinite(out).all()                        # edges included: every voxel in some patch
        err[s] = float(np.sqrt(np.mean((out - clean) ** 2)))
        if s == 1:
            assert np.array_equal(out, mppca(noisy))         # stride 1 is the DIPY-equal default
    noise_rmse = float(np.sqrt(np.mean((noisy - clean) ** 2)))
    # measured: RMSE 0.150 noisy; 0.049 / 0.050 / 0.052 at strides 1 / 2 / 3
    assert err[1] < 0.4 * noise_rmse
    assert err[2] < 1.1 * err[1] and err[3] < 1.2 * err[1]
    # masked ("roi"): inside covered, outside the input
    mask = np.zeros(shape, bool)
    mask[4:15, 3:12, 5:13] = True
    out = mppca(noisy, mask=mask, stride=2)
    assert np.isfinite(out).all() and np.array_equal(out[~mask], noisy[~mask])
    assert float(np.sqrt(np.mean((out[mask] - clean[mask]) ** 2))) < 0.4 * noise_rmse


def test_stride_work_and_errors():
    data = lowrank((15, 14, 13), 20).astype(np.float32)
    counts = {}
    for s in (1, 2):
        mppca(data, stride=s)
        counts[s] = mppca.last_stats["patches"]
    assert counts[1] == 11 * 10 * 9 and counts[2] == 6 * 6 * 5     # r, r+2, ... plus the last centre
    with pytest.raises(ValueError, match="patch width"):
        mppca(data, stride=6)
    with pytest.raises(ValueError, match="roi"):
        mppca(data, mask=np.ones(data.shape[:3], bool), mask_mode="dipy", stride=2)


def test_device_is_chosen_automatically(monkeypatch):
    # device=None (the workflow's call): "cuda" when torch sees one, else "cpu"; an explicit device is kept
    import torch

    from bids_adhd.dmri.denoise import auto_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto_device(None) == "cuda"
    assert auto_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_device(None) == "cpu"
    data = lowrank(n=12).astype(np.float32)
    auto = mppca(data, patch_radius=1, nprocs=2, return_sigma=True)
    cpu = mppca(data, patch_radius=1, nprocs=2, return_sigma=True, device="cpu")
    assert all(np.array_equal(a, b) for a, b in zip(auto, cpu))
    with pytest.raises(RuntimeError):                     # a device this machine lacks is an error, not the CPU
        mppca(data, patch_radius=1, device="no-such-device")

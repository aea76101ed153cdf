"""Tensor fit (bids_adhd.dmri.dti.fit_dti) and brain mask (bids_adhd.dmri.mask).

Tolerances: noise-free signal from a known tensor field -> FA/MD/AD/RD and
the 6 tensor components within 1e-5 (relative to MD for diffusivities) of the
truth; with Rician noise (SNR 50 on b0) median |FA error| < 0.03; against a
direct DIPY TensorModel fit: equal to float32 rounding (1e-6).
"""
from __future__ import annotations

import numpy as np
import pytest

from bids_adhd.dmri.dti import fit_dti
from bids_adhd.dmri.mask import brain_mask, mean_b0, multi_median
from bids_adhd.errors import DataError


def btable(n_dirs=30, n_b0=3, shells=(1000.0,), seed=0):
    rng = np.random.default_rng(seed)
    bvals, bvecs = [0.0] * n_b0, [np.zeros(3)] * n_b0
    for b in shells:
        v = rng.normal(size=(n_dirs, 3))
        bvecs += list(v / np.linalg.norm(v, axis=1, keepdims=True))
        bvals += [b] * n_dirs
    return np.array(bvals), np.array(bvecs)


def tensor_field(shape=(6, 5, 4), seed=1):
    """A different, known tensor in every voxel: evals (X,Y,Z,3) and rotations (X,Y,Z,3,3)."""
    rng = np.random.default_rng(seed)
    l1 = rng.uniform(1.2e-3, 2.0e-3, shape)
    l2 = rng.uniform(0.2e-3, 0.9e-3, shape)
    l3 = l2 * rng.uniform(0.6, 1.0, shape)
    evals = np.stack([l1, l2, l3], -1)
    q, _ = np.linalg.qr(rng.normal(size=shape + (3, 3)))
    D = np.einsum("...ij,...j,...kj->...ik", q, evals, q)
    return evals, D


def signal(D, bvals, bvecs, s0=1000.0):
    return s0 * np.exp(-bvals * np.einsum("ni,...ij,nj->...n", bvecs, D, bvecs))


def fa_of(ev):
    md = ev.mean(-1, keepdims=True)
    return np.sqrt(1.5 * ((ev - md) ** 2).sum(-1) / (ev ** 2).sum(-1))


def test_noise_free_known_tensor_exact_and_component_order():
    bvals, bvecs = btable()
    evals, D = tensor_field()
    data = signal(D, bvals, bvecs)
    res = fit_dti(data, bvals, bvecs)
    md = evals.mean(-1)
    assert np.abs(res["fa"] - fa_of(evals)).max() < 1e-5
    assert np.abs(res["md"] - md).max() / md.min() < 1e-5
    assert np.abs(res["ad"] - evals[..., 0]).max() / md.min() < 1e-5
    assert np.abs(res["rd"] - evals[..., 1:].mean(-1)).max() / md.min() < 1e-5
    # lower-triangular order: Dxx, Dxy, Dyy, Dxz, Dyz, Dzz
    lt = np.stack([D[..., 0, 0], D[..., 0, 1], D[..., 1, 1], D[..., 0, 2], D[..., 1, 2], D[..., 2, 2]], -1)
    assert np.abs(res["tensor"] - lt).max() / md.min() < 1e-5
    v1 = res["evecs"][..., :, 0]
    assert np.allclose(np.einsum("...ij,...j->...i", D, v1), evals[..., :1] * v1, atol=1e-8)


def test_bmax_drops_high_shell_and_mask_zeroes_outside():
    bvals, bvecs = btable(shells=(1000.0, 3000.0))
    evals, D = tensor_field()
    data = signal(D, bvals, bvecs)
    data[..., bvals > 2000] *= 0.3          # not a Gaussian-diffusion signal: must be ignored
    mask = np.zeros(data.shape[:3], bool)
    mask[1:5, 1:4, 1:3] = True
    res = fit_dti(data, bvals, bvecs, mask=mask, bmax=1500)
    assert res["used"].sum() == 3 + 30
    assert np.abs(res["fa"][mask] - fa_of(evals)[mask]).max() < 1e-5
    for key in ("fa", "md", "ad", "rd"):
        assert (res[key][~mask] == 0).all()
    assert (res["tensor"][~mask] == 0).all()
    bad = fit_dti(data, bvals, bvecs, mask=mask, bmax=4000)    # with the 3000 shell: wrong
    assert np.abs(bad["fa"][mask] - fa_of(evals)[mask]).max() > 1e-2


@pytest.mark.parametrize("method", ["WLS", "OLS"])
def test_noisy_bound_and_equal_to_direct_dipy(method):
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    bvals, bvecs = btable(n_dirs=32)
    evals, D = tensor_field(shape=(8, 8, 5), seed=4)
    rng = np.random.default_rng(5)
    clean = signal(D, bvals, bvecs)
    data = np.sqrt((clean + rng.normal(scale=20, size=clean.shape)) ** 2
                   + rng.normal(scale=20, size=clean.shape) ** 2).astype(np.float32)
    res = fit_dti(data, bvals, bvecs, method=method, nprocs=2, chunk=50)
    assert np.median(np.abs(res["fa"] - fa_of(evals))) < 0.03
    fit = TensorModel(gradient_table(bvals, bvecs=bvecs), fit_method=method).fit(data)
    assert np.abs(res["fa"] - np.clip(np.nan_to_num(fit.fa), 0, 1)).max() < 1e-6
    assert np.abs(res["md"] - fit.md).max() < 1e-9
    assert np.abs(res["tensor"] - fit.lower_triangular()).max() < 1e-9
    # chunking/threads do not change the result
    assert np.array_equal(res["fa"], fit_dti(data, bvals, bvecs, method=method)["fa"])


@pytest.mark.parametrize("method", ["WLS", "OLS"])
def test_float32_input_is_fitted_in_float64(method):
    """DIPY takes the log in the input's precision; fit_dti converts first, so float32 data give the
    float64 fit of the same values (float32 logs moved FA by ~1e-6 on real-size data)."""
    bvals, bvecs = btable(n_dirs=32)
    _, D = tensor_field(shape=(8, 8, 5), seed=9)
    rng = np.random.default_rng(10)
    d32 = (signal(D, bvals, bvecs) + rng.normal(scale=5, size=(8, 8, 5, len(bvals)))).astype(np.float32)
    a = fit_dti(d32, bvals, bvecs, method=method)
    b = fit_dti(d32.astype(np.float64), bvals, bvecs, method=method)
    for key in ("fa", "md", "tensor", "evals"):
        assert np.array_equal(a[key], b[key]), key


def test_wls_normal_equations_equal_dipy_pinv_solution():
    """The WLS fit solves the weighted problem from its normal equations; DIPY uses one pinv per voxel."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import design_matrix, wls_fit_tensor

    from bids_adhd.dmri.dti import _wls_fit_tensor

    bvals, bvecs = btable(n_dirs=32, shells=(1000.0, 1500.0))
    _, D = tensor_field(shape=(10, 10, 6), seed=7)
    rng = np.random.default_rng(8)
    clean = signal(D, bvals, bvecs)
    data = np.sqrt((clean + rng.normal(scale=30, size=clean.shape)) ** 2
                   + rng.normal(scale=30, size=clean.shape) ** 2).reshape(-1, len(bvals))
    X = design_matrix(gradient_table(bvals, bvecs=bvecs))
    ours, _ = _wls_fit_tensor(X, data)
    ref, _ = wls_fit_tensor(X, data)
    assert ours.shape == ref.shape == (600, 12)
    assert np.abs(ours[:, :3] - ref[:, :3]).max() / np.abs(ref[:, :3]).max() < 1e-9      # eigenvalues
    # eigenvectors up to sign
    dots = np.abs(np.einsum("nij,nij->nj", ours[:, 3:].reshape(-1, 3, 3), ref[:, 3:].reshape(-1, 3, 3)))
    assert np.abs(dots - 1).max() < 1e-6


def test_dti_input_errors():
    bvals, bvecs = btable(n_dirs=5)
    data = np.ones((2, 2, 2, len(bvals)))
    with pytest.raises(DataError, match="at least 6"):
        fit_dti(data, bvals, bvecs)
    # 12 weighted volumes along only 3 directions: no tensor can be determined
    bvals, bvecs = btable(n_dirs=12)
    bvecs[3:] = np.tile(np.eye(3), (4, 1))
    with pytest.raises(DataError, match="rank < 7"):
        fit_dti(np.ones((2, 2, 2, len(bvals))), bvals, bvecs)
    bvals, bvecs = btable()
    with pytest.raises(DataError, match="do not match"):
        fit_dti(data, bvals, bvecs)


@pytest.mark.parametrize("shape", [(20, 21, 40), (12, 10, 9), (9, 8, 3), (15, 14, 1)])
def test_threaded_multi_median_is_dipys(shape):
    # z slabs on threads, each with its neighbours' planes as a halo: the same windows as one whole-volume filter
    from dipy.segment.mask import multi_median as dipy_multi_median

    vol = np.random.default_rng(3).gamma(2.0, 50.0, size=shape).astype(np.float32)
    for radius, numpass in ((1, 1), (2, 2), (3, 4)):
        ref = dipy_multi_median(vol, radius, numpass)
        for nprocs in (1, 2, 3, 7):
            assert np.array_equal(multi_median(vol, radius, numpass, nprocs), ref), (radius, numpass, nprocs)
    assert np.array_equal(vol, np.random.default_rng(3).gamma(2.0, 50.0, size=shape).astype(np.float32))


def test_mask_is_median_otsu_of_mean_b0():
    from dipy.segment.mask import median_otsu

    bvals, bvecs = btable(n_dirs=6, n_b0=2)
    g = np.stack(np.meshgrid(*[np.arange(s) for s in (28, 30, 22)], indexing="ij"), -1)
    inside = (((g - [14, 15, 11]) / [10, 11, 8]) ** 2).sum(-1) < 1
    rng = np.random.default_rng(2)
    data = np.where(inside[..., None], 800.0, 20.0) * np.exp(-bvals * 1e-3) + rng.normal(scale=10, size=g.shape[:3] + (8,))
    data = np.abs(data)
    b0 = mean_b0(data, bvals)
    assert np.allclose(b0, data[..., :2].mean(-1), rtol=1e-6)
    for nprocs in (1, 2):
        mask, b0_out = brain_mask(data, bvals, median_radius=2, numpass=2, nprocs=nprocs)
        assert np.array_equal(b0_out, b0)
        assert np.array_equal(mask, median_otsu(b0, median_radius=2, numpass=2)[1])
    holes = brain_mask(data, bvals, median_radius=1, numpass=1, finalize_mask=True, nprocs=2)[0]
    assert np.array_equal(holes, median_otsu(b0, median_radius=1, numpass=1, finalize_mask=True)[1])
    # the object, slightly eroded by the median filter: nothing outside, most of the inside
    assert not (mask & ~inside).any() and mask.sum() > 0.8 * inside.sum()
    with pytest.raises(DataError, match="no b0"):
        mean_b0(data, bvals + 100)

"""Leave-one-out tensor prediction (bids_adhd.dmri.predict): the hat-matrix identity
gives exactly what an explicit refit without each volume gives (DIPY's OLS tensor
fit as the independent reference), shell by shell, with volumes excluded or not."""
from __future__ import annotations

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel, design_matrix

from bids_adhd.dmri.predict import loo_predict, shells


def _series(seed=0, n_per_shell=12):
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(2 * n_per_shell, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bvals = np.r_[0, 0, np.full(n_per_shell, 1000.0), 0, np.full(n_per_shell, 2000.0)]
    bvecs = np.r_[np.zeros((2, 3)), dirs[:n_per_shell], np.zeros((1, 3)), dirs[n_per_shell:]]
    shape = (5, 4, 3)
    e = rng.normal(size=shape + (3,))
    e /= np.linalg.norm(e, axis=-1, keepdims=True)
    D = 1.2e-3 * e[..., :, None] * e[..., None, :] + 0.4e-3 * np.eye(3)
    s0 = rng.uniform(800, 1200, shape)
    sig = s0[..., None] * np.exp(-bvals * np.einsum("nj,...jk,nk->...n", bvecs, D, bvecs))
    sig *= np.exp(rng.normal(scale=0.03, size=sig.shape))          # noise: the fits are not exact
    return sig.astype(np.float64), bvals, bvecs


def _refit_prediction(sig, bvals, bvecs, i, rows, dipy_fit=True):
    """Predict volume i from an explicit OLS refit on ``rows`` without i: DIPY's own
    TensorModel (which clamps negative eigenvalues, so only where the fit is regular),
    or a plain least-squares solve on DIPY's design matrix."""
    fit_rows = [r for r in rows if r != i]
    gt = gradient_table(bvals[fit_rows], bvecs=bvecs[fit_rows], b0_threshold=0)
    gi = gradient_table(bvals[[0, i]], bvecs=bvecs[[0, i]], b0_threshold=0)
    if dipy_fit:
        fit = TensorModel(gt, fit_method="OLS", return_S0_hat=True).fit(sig[..., fit_rows])
        return fit.predict(gi, S0=fit.S0_hat)[..., 1]
    y = np.log(sig[..., fit_rows]).reshape(-1, len(fit_rows)).T
    beta = np.linalg.lstsq(design_matrix(gt), y, rcond=None)[0]
    return np.exp(design_matrix(gi)[1] @ beta).reshape(sig.shape[:3])


def test_shells_grouping():
    assert [list(s) for s in shells([0, 1000, 990, 5, 2000, 2010, 1005])] == [[1, 2, 6], [4, 5]]


def test_loo_matches_explicit_refits_per_shell():
    sig, bvals, bvecs = _series()
    pred = loo_predict(sig, bvals, bvecs)
    b0 = [0, 1, 14]
    for s in shells(bvals):
        rows = b0 + list(s)
        for i in s:
            ref = _refit_prediction(sig, bvals, bvecs, i, rows)
            assert np.allclose(pred[..., i], ref, rtol=1e-4), i
    # b0 volumes: the mean of the other b0s
    assert np.allclose(pred[..., 0], sig[..., [1, 14]].mean(-1), rtol=1e-5)
    # a real prediction: close to the observed signal, not equal to it
    dw = bvals > 0
    rel = np.abs(pred[..., dw] / sig[..., dw] - 1)
    assert 0.005 < np.median(rel) < 0.1


def test_excluded_volumes_leave_every_fit():
    sig, bvals, bvecs = _series(seed=1)
    bad = np.zeros(bvals.size, bool)
    bad[[3, 7]] = True
    sig2 = sig.copy()
    sig2[..., 3] *= 0.2                                   # a dropout: must not change any prediction
    p1 = loo_predict(sig, bvals, bvecs, exclude=bad)
    p2 = loo_predict(sig2, bvals, bvecs, exclude=bad)
    assert np.allclose(p1, p2, rtol=1e-5)
    rows = [0, 1, 14] + [r for r in shells(bvals)[0] if r not in (3, 7)]
    for i in (3, 5):                                      # an excluded and a kept volume
        ref = _refit_prediction(sig, bvals, bvecs, i, rows, dipy_fit=False)
        assert np.allclose(p1[..., i], ref, rtol=1e-4), i


def test_slabs_and_mask_do_not_change_the_prediction():
    """The slab size is a memory knob only: one-plane slabs, a masked subset and the whole
    volume at once give the same predictions; voxels outside the mask stay 0."""
    sig, bvals, bvecs = _series(seed=2)
    bad = np.zeros(bvals.size, bool)
    bad[5] = True
    whole = loo_predict(sig, bvals, bvecs, exclude=bad, slab_voxels=10**9)
    planes = loo_predict(sig, bvals, bvecs, exclude=bad, slab_voxels=1)
    np.testing.assert_allclose(planes, whole, rtol=1e-6)
    mask = np.zeros(sig.shape[:3], bool)
    mask[1:4, 1:3, :] = True
    masked = loo_predict(sig, bvals, bvecs, exclude=bad, mask=mask, slab_voxels=7)
    np.testing.assert_allclose(masked[mask], whole[mask], rtol=1e-6)
    assert not masked[~mask].any()

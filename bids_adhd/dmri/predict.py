"""Leave-one-out prediction of each DWI volume from the others (shell-wise tensor).

Motion correction registers every diffusion-weighted volume to a prediction
of that volume from the *other* volumes (the contrast then matches: QSIPrep's
SHORELine, FSL eddy). The model is the diffusion tensor fitted by ordinary
least squares to the log signal, ``log S = X beta`` with DIPY's design matrix
``X`` (7 columns: 6 tensor elements and ``log S0``), one fit per shell (the
b0 volumes plus that shell's volumes): a shell-wise tensor also describes a
shell above ~1500 s/mm^2 well enough to register to, where a single tensor
over all shells would not (non-Gaussian diffusion).

Hat-matrix identity (why no refit per volume): for a linear least-squares fit
with hat matrix ``H = X (X^T X)^-1 X^T`` and residuals ``e = y - H y``, the
prediction of row ``i`` from the fit *without* row ``i`` is
``y_i - e_i / (1 - h_ii)`` (the PRESS / leave-one-out residual). One fit per
shell gives every leave-one-out prediction; ``tests/test_dmri_predict.py``
checks it against explicit refits.
"""
from __future__ import annotations

import numpy as np

__all__ = ["shells", "loo_predict", "voxel_slabs"]

#: smallest signal taken into the log (background voxels are 0)
_FLOOR = 1e-3


def shells(bvals, b0_threshold=50.0, tol=100.0):
    """Group the diffusion-weighted volumes into shells: list of index arrays (b-values within ``tol``)."""
    bvals = np.asarray(bvals, float).ravel()
    dw = np.flatnonzero(bvals > b0_threshold)
    out = []
    for i in dw[np.argsort(bvals[dw], kind="stable")]:
        if out and abs(bvals[i] - bvals[out[-1][0]]) <= tol:
            out[-1].append(i)
        else:
            out.append([i])
    return [np.array(sorted(s)) for s in out]


def _design(bvals, bvecs):
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import design_matrix

    gtab = gradient_table(np.asarray(bvals, float), bvecs=np.asarray(bvecs, float), b0_threshold=0)
    return design_matrix(gtab)


def loo_log_predict(y, X, weights=None):
    """Leave-one-out predictions of the rows of ``y`` (n, m) under ``y ~ X beta``.

    ``weights`` (n,) of 0/1 drops rows from the fit (a dropped row is still
    predicted, from all kept rows). Returns (n, m).
    """
    X = np.asarray(X, float)
    w = np.ones(len(X)) if weights is None else np.asarray(weights, float)
    Xw = X * w[:, None]
    pinv = np.linalg.pinv(Xw)                        # (p, n): beta = pinv @ (w y)
    H = X @ pinv * w[None, :]                        # fitted values of every row from the kept rows
    fitted = H @ y
    h = np.clip(np.diag(H), 0.0, 1.0 - 1e-6)
    loo = y - (y - fitted) / (1.0 - h)[:, None]      # kept rows: the PRESS identity
    dropped = w == 0
    loo[dropped] = fitted[dropped]                   # a dropped row never entered the fit
    return loo


#: voxels per slab of :func:`loo_predict` (its float64 work arrays are (N, slab voxels); one slab of
#: 65,536 voxels x 133 volumes is ~70 MB per array, the whole HBN head box at once was ~1 GB each)
SLAB_VOXELS = 65_536


def voxel_slabs(mask, slab_voxels=SLAB_VOXELS):
    """``(slice, mask[slice])`` for slabs of whole planes along the first axis of ``mask`` with about
    ``slab_voxels`` voxels each (at least one plane), skipping slabs without a masked voxel."""
    step = max(1, int(slab_voxels) // max(1, int(np.prod(mask.shape[1:3]))))
    for x0 in range(0, mask.shape[0], step):
        sl = slice(x0, min(mask.shape[0], x0 + step))
        if mask[sl].any():
            yield sl, mask[sl]


def loo_predict(data, bvals, bvecs, b0_threshold=50.0, mask=None, exclude=None, slab_voxels=SLAB_VOXELS):
    """Leave-one-out tensor prediction of every diffusion-weighted volume.

    Parameters
    ----------
    data : (X, Y, Z, N) array, the volumes aligned to one frame
    bvals, bvecs : (N,), (N, 3); b-vectors in any frame that is the same for all volumes
    mask : (X, Y, Z) bool, optional: voxels to predict (others 0)
    exclude : (N,) bool, optional: volumes kept out of every fit (still predicted)
    slab_voxels : work on slabs of whole planes along the first axis of about this many voxels
        (memory; every voxel's prediction is its own, so the result does not depend on it)

    Returns
    -------
    (X, Y, Z, N) float32: the prediction of each DW volume from the others of
    its shell and the b0s; b0 volumes get the mean of the other b0s. Voxels outside
    ``mask`` are never written (their pages of the zero-initialised output stay unallocated).
    """
    arr = np.asarray(data)
    bvals = np.asarray(bvals, float).ravel()
    bvecs = np.asarray(bvecs, float)
    m = np.ones(arr.shape[:3], bool) if mask is None else np.asarray(mask, bool)
    keep = np.ones(bvals.size, bool) if exclude is None else ~np.asarray(exclude, bool)
    b0 = np.flatnonzero(bvals <= b0_threshold)
    fits = []                                         # per shell: (its volumes, rows, X) or (volumes, None, None)
    for s in shells(bvals, b0_threshold):
        rows = np.concatenate([b0, s])
        X = _design(np.where(bvals[rows] <= b0_threshold, 0.0, bvals[rows]), bvecs[rows])
        fits.append((s, rows, X) if keep[rows].sum() > X.shape[1] else (s, None, None))
    b0_others = [[j for j in b0 if j != i and keep[j]] or [j for j in b0 if j != i] or [i] for i in b0]
    out = np.zeros(arr.shape, np.float32)
    for sl, ms in voxel_slabs(m, slab_voxels):
        y = np.log(np.maximum(arr[sl][ms].astype(np.float64), _FLOOR)).T      # (N, V)
        pred = np.zeros_like(y)
        for s, rows, X in fits:
            if rows is None:                          # too few volumes for a tensor: the others' mean
                for i in s:
                    others = [j for j in s if j != i] or [i]
                    pred[i] = y[others].mean(0)
                continue
            pred[s] = loo_log_predict(y[rows], X, keep[rows].astype(float))[len(b0):]
        for i, others in zip(b0, b0_others):          # b0: mean of the other kept b0s
            pred[i] = np.log(np.exp(y[others]).mean(0))
        out[sl][ms] = np.exp(pred).T.astype(np.float32)
    return out

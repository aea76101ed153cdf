"""Denoising of a 4-D diffusion series: MP-PCA (vectorised, equal to DIPY's
``mppca``) and DIPY's Patch2Self.

MP-PCA
------
:func:`mppca` computes what ``dipy.denoise.localpca.mppca`` computes
(Veraart et al. 2016; DIPY's ``genpca`` with ``tau_factor=None``), with the
per-patch work batched:

* one patch per voxel ``v`` whose whole ``(2r+1)^3`` neighbourhood lies in the
  volume (centres ``r <= i < X - r``; a dimension of size 1 gets radius 0);
  ``X_p`` = the patch's ``m`` voxels x ``N`` volumes, centred by its mean ``M``;
* ``C = X_p^T X_p / m`` and its eigenvalues ``d`` (ascending) and vectors
  (``eigh``; ``pca_method="svd"``: from the SVD of ``X_p``; with more volumes
  than patch voxels, ``N > m``, the m x m Gram matrix ``X_p X_p^T / m``,
  which has the same non-zero eigenvalues, is decomposed instead and the
  ``N - m`` others are 0);
* DIPY's Marchenko-Pastur classifier (``_pca_classifier``): keep the last
  ``m - 1`` eigenvalues if ``N > m - 1``; starting from ``c = n-1`` and
  ``var = mean(L)``, while ``L[c] - L[0] - 4 sqrt((c+1)/m) var > 0``:
  ``var = mean(L[:c])``, ``c -= 1``; ``sigma^2 = var``;
* ``tau = (1 + sqrt(N/m))^2 sigma^2``; the eigenvectors with ``d < tau`` are
  dropped (count ``ncomps``); ``X_est = X_p W W^T + M``;
* overlapping patches are averaged with DIPY's weight
  ``theta_p = 1 / (1 + N - ncomps)``: ``out = sum theta_p X_est / sum theta_p``,
  clipped at 0; ``sigma`` (``return_sigma``) = ``sqrt(sum theta_p var_p /
  sum theta_p)``.

Patches are processed in batches (about 2^20 patch values, 32 to 256
patches, at a time: one batched ``torch.bmm``/``eigh`` call each), z-slab
work items are shared between ``nprocs`` threads (the kernels release the
GIL) with one BLAS/OpenMP thread each, and each slab accumulates into its own
buffer (bounded memory).

Masks (``mask_mode``)
  ``"roi"`` (default): one patch centred at every mask voxel, as
  ``dwidenoise -mask`` (and DIPY's mask mode) do; inside the mask the output
  equals DIPY's masked result, which on the mask eroded by the patch radius
  is DIPY's *unmasked* result; outside the mask (and at a mask voxel that no
  such patch covers) the input is returned unchanged and sigma is 0. The
  workflow uses it with a pre-mask dilated by ``radius + 2``, so the brain
  dilated by 2 voxels is DIPY's unmasked result: it only saves work. With
  ``stride > 1`` the lattice centres within the mask dilated by the radius
  are used, so that every mask voxel is covered.
  ``"dipy"``: exactly ``dipy.mppca(arr, mask=mask)``: only patches centred in
  the mask; 0 outside the mask (NaN where a masked voxel is covered by no
  patch, as DIPY).

Precision (``dtype``)
  DIPY's rule by default: the covariance eigen-decomposition runs in float64
  for float64 input and in float32 otherwise (DIPY's ``calc_dtype``). In
  float32 the centred patch (patch minus its mean, the mean taken in float64
  and rounded to float32, as DIPY's float32 mean), the covariance/Gram matrix,
  its eigen-decomposition and the projection ``X_est`` are float32, as in
  DIPY, and so are the ``theta * X_est`` sums (DIPY sums in float32 too; the
  theta sums are float64); in float64 mode everything is float64. With
  float64 input the result equals DIPY's to ~1e-7 of the data range (the
  float32 output). In float32 a patch's decision (MP stopping index, which
  eigenvalues fall below ``tau``) flips where an eigenvalue sits within
  float32 rounding of the threshold, ~0.15 % of patches on a DWI phantom;
  DIPY's own float32 run has such flips too (a different LAPACK routine), so
  float32 results agree with DIPY's float32 results, and with the float64
  ones, only to ~1e-3 of the range at a few voxels (median ~1e-7). Pass
  ``dtype="float64"`` for the float64 result from float32 data (it takes
  longer).

Patches whose data are rank deficient (made mostly of exactly constant
voxels, e.g. zero-filled background) have eigenvalues that are pure rounding
noise; DIPY's threshold decision there is decided by that noise, so neither
DIPY-in-float32 vs DIPY-in-float64 nor this code reproduce it bit for bit.
Real DWI has noise everywhere; the tests use data without such patches.
"""
from __future__ import annotations

import threading
import warnings

import numpy as np

from ._parallel import resolve_nprocs, single_threaded_blas, thread_map

__all__ = ["mppca", "patch2self", "denoise", "auto_device"]


def auto_device(device=None):
    """The torch device MP-PCA runs on: ``device`` itself, or for None "cuda" when torch sees a CUDA
    device, else "cpu". (Gibbs unringing has its own rule, which also avoids importing torch:
    ``gibbs._resolve_device``; MP-PCA needs torch either way.)"""
    if device is not None:
        return str(device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _patch_radius(shape3, patch_radius):
    pr = np.ones(3, dtype=int) * patch_radius if np.isscalar(patch_radius) else np.asarray(patch_radius, int)
    if pr.shape != (3,):
        raise ValueError("patch_radius should have length 3")
    pr = pr.copy()
    pr[np.asarray(shape3) == 1] = 0
    return pr


def _lattice(shape3, pr, stride):
    """Boolean grid of the patch centres ``r, r + s, r + 2s, ...`` and ``n - r - 1`` along each axis."""
    axes = []
    for n, r in zip(shape3, pr):
        keep = np.zeros(n, dtype=bool)
        if n - 2 * r > 0:
            keep[r:n - r:stride] = True
            keep[n - r - 1] = True
        axes.append(keep)
    return axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]


def _mp_classify(L, m):
    """Vectorised DIPY ``_pca_classifier`` on torch rows ``L`` (ascending eigenvalues).

    Returns the noise variance per row: ``mean(L[:c*+1])`` for the largest
    ``c*`` with ``not (L[c] - L[0] - 4 sqrt((c+1)/m) mean(L[:c+1]) > 0)``,
    which is where DIPY's while-loop stops; NaN where it runs past ``c = 0``
    (DIPY then takes the mean of an empty slice).
    """
    import torch

    if L.shape[1] > m - 1:
        L = L[:, -(m - 1):]
    n = L.shape[1]
    cnt = torch.arange(1, n + 1, dtype=L.dtype, device=L.device)
    cmean = torch.cumsum(L, 1) / cnt                        # mean(L[:c+1])
    r = (L - L[:, :1]) - (4 * torch.sqrt(cnt / m)) * cmean   # DIPY's r(c), same association
    idx = torch.arange(n, device=L.device).expand_as(L)
    cstar = torch.where(~(r > 0), idx, torch.full_like(idx, -1)).amax(1)
    var = cmean.gather(1, cstar.clamp(min=0)[:, None])[:, 0]
    return torch.where(cstar >= 0, var, torch.full_like(var, float("nan")))


class _Accumulator:
    """Global sums fed slab by slab.

    Each slab sums its patches in the working precision (theta in float64); the global ``theta * X_est`` sum is
    float32 (every voxel receives only 2-3 slab sums, so the rounding is at
    float32 level, like the float32 output) to keep memory at one copy of the
    data. Slab sums are added in slab order whatever order the threads finish
    in, so the result does not depend on ``nprocs`` or timing.
    """

    def __init__(self, shape4, want_var):
        self.thetax = np.zeros(shape4, dtype=np.float32)
        self.theta = np.zeros(shape4[:3], dtype=np.float64)
        self.var = np.zeros(shape4[:3], dtype=np.float64) if want_var else None
        self.lock = threading.Lock()
        self._pending = {}
        self._next = 0

    def add(self, index, part):
        """``part`` = (lo, tx, th, va) or None for slab ``index``."""
        with self.lock:
            self._pending[index] = part
            while self._next in self._pending:
                part = self._pending.pop(self._next)
                self._next += 1
                if part is None:
                    continue
                lo, tx, th, va = part
                sl = tuple(slice(a, a + n) for a, n in zip(lo, th.shape))
                self.thetax[sl] += tx
                self.theta[sl] += th
                if self.var is not None:
                    self.var[sl] += va


def _decompose(Xc, m, N, is_svd, gram, device):
    """Eigenvalues ``d`` (nb, N) ascending, float64, and eigenvectors ``W`` of the patch covariance.

    ``gram``: the m x m Gram matrix ``X X^T / m`` is decomposed instead (more
    volumes than patch voxels: same non-zero spectrum; the other ``N - m``
    eigenvalues are 0; DIPY gets them as rounding-level values, below tau
    either way). "svd": from the SVD of ``X_p``.
    """
    import torch

    nb, f64 = Xc.shape[0], torch.float64
    if is_svd:
        _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
        k = S.shape[1]
        d = torch.zeros((nb, N), dtype=f64, device=device)
        d[:, N - k:] = S.flip(1) ** 2 / m
        W = torch.zeros((nb, N, N), dtype=f64, device=device)
        W[:, :, N - k:] = Vh.flip(1).transpose(1, 2)
        return d, W
    if gram:
        dG, W = torch.linalg.eigh(torch.bmm(Xc, Xc.transpose(1, 2)) / m)
        return torch.cat([torch.zeros((nb, N - m), dtype=f64, device=device), dG.to(f64)], 1), W
    dc, W = torch.linalg.eigh(torch.bmm(Xc.transpose(1, 2), Xc) / m)
    return dc.to(f64), W


def _patch_batch(Pt, m, dim, tfac2, low, is_svd, device):
    """Denoise one batch of patches ``Pt`` (nb, m, N): ``theta * X_est``, ``theta``, ``var``.

    float32 mode (``low``, DIPY's float32 rule): centring, covariance/Gram
    matrix, eigen-decomposition and projections in float32 with the mean taken
    in float64; otherwise all float64.
    """
    import torch

    f32, f64 = torch.float32, torch.float64
    nb, _, N = Pt.shape
    ct = f32 if low else f64
    if low:
        Mn = Pt.to(f64).mean(1, keepdim=True)           # (a float64 copy first: 0.36 vs 0.61 ms a batch)
        Xc = Pt - Mn.to(f32) if Pt.dtype == f32 else (Pt - Mn).to(f32)
        Mn = Mn.to(f32)
    else:
        Xp = Pt.to(f64)                                # exact for float32 input
        Mn = Xp.mean(1, keepdim=True)
        Xc = Xp - Mn
    gram = (not is_svd) and m < N
    d, W = _decompose(Xc, m, N, is_svd, gram, device)
    var = _mp_classify(d, m)
    ncomps = (d < (tfac2 * var)[:, None]).sum(1)
    theta = 1.0 / (1.0 + dim - ncomps.to(f64))
    rmax = int((N - ncomps).max())                     # retained components are the last ones
    tc = theta.to(ct)[:, None, None]
    # theta * (Xc W W^T + M) = theta M + (Xc W) (theta W)^T, in one baddbmm
    if gram and rmax > 0:
        r = min(rmax, m)                              # column j of d is Gram column j - (N - m)
        col = torch.arange(N - r, N, device=device)
        Ur = W[:, :, m - r:] * (col[None, :] >= ncomps[:, None]).to(ct)[:, None, :]
        Xw = torch.baddbmm(Mn * tc, Ur, torch.bmm(Ur.transpose(1, 2), Xc) * tc)
    elif rmax > 0:
        col = torch.arange(N - rmax, N, device=device)
        Wr = W[:, :, N - rmax:] * (col[None, :] >= ncomps[:, None]).to(ct)[:, None, :]
        Xw = torch.baddbmm(Mn * tc, torch.bmm(Xc, Wr), Wr.transpose(1, 2) * tc)
    else:
        Xw = (Mn * tc).expand(-1, m, -1)
    return Xw, theta, var


def _slab_work(index, arr, centres, k0, k1, pr, dim, m, tau_factor, is_svd, mode, device, batch, acc,
               stats):
    """Process the patch centres with k0 <= k < k1 (``centres`` is the boolean centre map)."""
    import torch

    X, Y, Z, N = arr.shape
    ps = 2 * pr + 1
    ci, cj, ck = np.nonzero(centres[pr[0]:X - pr[0], pr[1]:Y - pr[1], k0:k1])
    if ci.size == 0:
        acc.add(index, None)
        return
    # bounding box of the voxels touched by this slab's patches
    lo = np.array([ci.min(), cj.min(), k0 - pr[2]])
    hi = np.array([ci.max() + ps[0], cj.max() + ps[1], k1 + pr[2]])
    sx, sy, sz = (int(v) for v in hi - lo)
    # the box as (voxels, N) rows: a patch is gathered with one index_select of its m rows (a fancy index
    # into a sliding-window view cost about as much as the covariance product)
    box = torch.from_numpy(np.ascontiguousarray(arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]).reshape(-1, N))
    box = box.to(device)
    ci, cj = ci - lo[0], cj - lo[1]                  # patch corners in the box
    f64 = torch.float64
    low = mode == "float32" and not is_svd
    # theta * X_est sums: float32 in float32 mode (as DIPY's float32 sums), float64 otherwise. They stay
    # on the CPU whatever the device: a GPU's index_add_ adds with atomics, in an order that changes
    # from run to run; the CPU's is fixed, so the result is the same bits on every run
    tx = torch.zeros((sx * sy * sz, N), dtype=torch.float32 if low else f64)
    th = torch.zeros(sx * sy * sz, dtype=f64)
    va = torch.zeros(sx * sy * sz, dtype=f64) if acc.var is not None else None
    # linear offsets of the m patch voxels from the patch corner, in the window's (px, py, pz) order
    oi, oj, ok = np.meshgrid(np.arange(ps[0]), np.arange(ps[1]), np.arange(ps[2]), indexing="ij")
    offs = torch.from_numpy((oi * sy * sz + oj * sz + ok).reshape(-1))
    for b0 in range(0, ci.size, batch):
        bi, bj, bk = ci[b0:b0 + batch], cj[b0:b0 + batch], ck[b0:b0 + batch]
        lin = (torch.from_numpy(bi * sy * sz + bj * sz + bk)[:, None] + offs[None, :]).reshape(-1)
        Pt = box.index_select(0, lin.to(device)).reshape(len(bi), m, N)
        Xw, theta, var = _patch_batch(Pt, m, dim, float(tau_factor) ** 2, low, is_svd, device)
        tx.index_add_(0, lin, Xw.reshape(-1, N).to(tx.dtype).cpu())
        th.index_add_(0, lin, theta.cpu().repeat_interleave(m))
        if va is not None:
            va.index_add_(0, lin, (var * theta).cpu().repeat_interleave(m))
    acc.add(index, (lo, tx.reshape(sx, sy, sz, N).numpy(), th.reshape(sx, sy, sz).numpy(),
                    None if va is None else va.reshape(sx, sy, sz).numpy()))
    with acc.lock:
        stats["patches"] += int(ci.size)


def _check_mppca(arr, pca_method, mask_mode, stride, dtype, patch_radius, suppress_warning):
    """Validate ``mppca``'s arguments: (precision mode, patch radii, patch size m)."""
    if arr.ndim != 4:
        raise ValueError("PCA denoising can only be performed on 4D arrays.", arr.shape)
    if pca_method.lower() not in ("eig", "svd"):
        raise ValueError("pca_method should be either 'eig' or 'svd'")
    if mask_mode not in ("roi", "dipy"):
        raise ValueError("mask_mode must be 'roi' or 'dipy'")
    if stride < 1 or (stride > 1 and mask_mode != "roi"):
        raise ValueError("stride must be a positive integer; stride > 1 needs mask_mode='roi'")
    if dtype is None:
        dtype = np.float64 if arr.dtype == np.float64 else np.float32
    mode = {"float64": "float64", "float32": "float32"}.get(np.dtype(dtype).name)
    if mode is None:
        raise ValueError("dtype must be None, 'float64' or 'float32'")
    pr = _patch_radius(arr.shape[:3], patch_radius)
    ps = 2 * pr + 1
    ash = np.asarray(arr.shape[:3])
    if np.any((ash != 1) & (ash < ps)):
        raise ValueError("Array 'arr' is incorrect shape")
    m = int(np.prod(ps))
    if m == 1:
        raise ValueError("Cannot have only 1 sample, please increase patch_radius.")
    if stride > 2 * int(pr[pr > 0].min()) + 1:
        raise ValueError(f"stride {stride} would leave voxels in no patch: use at most the patch width "
                         "(2 x radius + 1)")
    dim = arr.shape[-1]
    if (m - 1) < dim and not suppress_warning:
        warnings.warn(f"Number of samples {dim} - 1 < Dimensionality {m}. This might have a performance "
                      "impact. Increase patch_radius to avoid this.", UserWarning, stacklevel=3)
    return mode, pr, m


def _centres(shape3, pr, mask, mask_mode, stride):
    """Boolean map of the patch centres to process, and the mask as bool (or None)."""
    X, Y, Z = shape3
    inner = np.zeros((X, Y, Z), dtype=bool)
    inner[pr[0]:X - pr[0], pr[1]:Y - pr[1], pr[2]:Z - pr[2]] = True
    if mask is None:
        centres = inner
    else:
        mask = np.asarray(mask).astype(bool)
        if mask.shape != (X, Y, Z):
            raise ValueError(f"mask shape {mask.shape} does not match the data {tuple(shape3)}")
        if mask_mode == "dipy" or stride == 1:
            centres = inner & mask
        else:       # a lattice needs centres up to the radius outside the mask to cover every mask voxel
            from scipy.ndimage import maximum_filter

            centres = inner & maximum_filter(mask, size=tuple(2 * pr + 1), mode="constant", cval=False)
    if stride > 1:
        centres = centres & _lattice((X, Y, Z), pr, stride)
    return centres, mask


def _slab_groups(centres, pr, slab):
    """Consecutive runs (<= ``slab``) of the z planes that hold patch centres: [[k0, k1), ...]."""
    Z = centres.shape[2]
    kz = np.arange(pr[2], Z - pr[2])
    kz = kz[centres[:, :, kz].any((0, 1))] if kz.size else kz
    groups = []
    for k in kz:
        if groups and k == groups[-1][1] and k - groups[-1][0] < slab:
            groups[-1][1] = k + 1
        else:
            groups.append([k, k + 1])
    return groups


def _finish(acc, arr, mask, mask_mode, return_sigma):
    """Overlap average (in place in the float32 sum), clip at 0, the mask rule; (den, sigma or None)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        den = acc.thetax                               # float32, divided in place
        den /= acc.theta[..., None].astype(np.float32)
        sig = np.sqrt(acc.var / acc.theta) if return_sigma else None
    den.clip(min=0, out=den)
    if mask is not None:
        if mask_mode == "dipy":
            den[~mask] = 0
        else:
            keep = ~mask | (acc.theta == 0)                  # outside, or a mask voxel no patch covers
            np.copyto(den, arr, where=keep[..., None])       # no (outside x N) temporary
            mask = ~keep
        if return_sigma:
            sig[~mask] = 0
    return den, None if sig is None else sig.astype(np.float32)


def mppca(data, mask=None, patch_radius=2, pca_method="eig", return_sigma=False, nprocs=1, *,
          mask_mode="roi", dtype=None, device=None, batch=None, slab=None, suppress_warning=False, stride=1):
    """MP-PCA denoising; the same result as ``dipy.denoise.localpca.mppca``.

    Parameters
    ----------
    data : ndarray (X, Y, Z, N)
    mask : ndarray (X, Y, Z) of bool, optional. See ``mask_mode``.
    patch_radius : int or (3,) ints; 2 gives 5x5x5 patches (DIPY's default).
    pca_method : "eig" | "svd"
    return_sigma : bool; also return the noise standard deviation map (float32).
    nprocs : int; worker threads (``None``/0: all CPUs).
    mask_mode : "roi" | "dipy"
        "roi": patches centred in the mask: inside it DIPY's masked output (its unmasked
        output on the mask eroded by the radius), input outside.
        "dipy": equal to ``dipy.mppca(data, mask=mask)``.
    dtype : None | "float64" | "float32"
        Precision of the covariance eigen-decomposition. None (default):
        DIPY's rule (float64 for float64 input, float32 otherwise; then the
        centring, projections and patch sums are float32 too). The module docstring says how float32 decisions differ.
    device : None | str; torch device for the gathers, covariances, eigen-decompositions and
        projections ("cpu", "cuda", ...; the overlap sums are always added on the CPU, in a fixed
        order). None (default): "cuda" when torch sees a CUDA device, else "cpu"
        (:func:`auto_device`).
    batch : int, optional
        Patches per batched eigen-decomposition (default: about 2^20 patch
        values, clipped to 32..256: 254 for 5x5x5 x 33 volumes, 63 for 133).
    slab : int, optional; patch-centre planes (along z) per work item (4).
    stride : int
        1 (default): a patch at every voxel, DIPY's result. ``s > 1``: patch
        centres on a lattice of step ``s`` (plus the last centre of each axis),
        about ``s^3`` times less work, an approximation of DIPY's result
        (docs/preprocessing.md); ``s <= 2r + 1``; needs ``mask_mode="roi"``.

    Returns
    -------
    denoised : float32 ndarray (X, Y, Z, N); sigma : float32 (X, Y, Z), only with ``return_sigma``.
    ``mppca.last_stats`` holds the last call's patch count and precision.
    """
    import torch

    arr = np.asarray(data)
    stride = int(stride)
    device = auto_device(device)
    mode, pr, m = _check_mppca(arr, pca_method, mask_mode, stride, dtype, patch_radius, suppress_warning)
    dim = arr.shape[-1]
    tau_factor = 1 + np.sqrt(dim / m)
    if batch is None:
        batch = int(np.clip((1 << 20) // (m * dim), 32, 256))
    # float32/float64 input is used as is (float64 mode converts batches exactly)
    work = arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float32)
    work = np.ascontiguousarray(work)
    centres, mask = _centres(arr.shape[:3], pr, mask, mask_mode, stride)
    acc = _Accumulator(arr.shape, return_sigma)
    # a fixed partition, not a function of nprocs: the float32 sum order, hence
    # the last bits of the result, depend on it
    groups = _slab_groups(centres, pr, slab or 4)
    stats = {"patches": 0, "precision": mode}

    def run(ig):
        i, g = ig
        _slab_work(i, work, centres, g[0], g[1], pr, dim, m, tau_factor, pca_method.lower() == "svd", mode,
                   device, batch, acc, stats)

    with single_threaded_blas():
        torch_threads = torch.get_num_threads()
        try:
            # in slab order: a slab's sums wait in the accumulator until every earlier slab's are added, so
            # an order that finishes slabs out of turn holds their buffers (an HBN-size run with the
            # largest slabs first peaked 317 MB higher in this step)
            thread_map(run, list(enumerate(groups)), resolve_nprocs(nprocs))
        finally:
            torch.set_num_threads(torch_threads)
    mppca.last_stats = stats
    den, sig = _finish(acc, arr, mask, mask_mode, return_sigma)
    return (den, sig) if return_sigma else den


def patch2self(data, bvals, model="ols", nprocs=1, *, b0_threshold=50, seed=0, **kwargs):
    """DIPY's Patch2Self (``dipy.denoise.patch2self.patch2self``), float32 out.

    DIPY's default version 3 sketches the data with ``np.random`` (global
    state, unseeded); here the global generator is seeded with ``seed`` for the
    call and restored afterwards, so the result is reproducible (``seed=None``:
    DIPY's behaviour). ``nprocs`` sets the BLAS thread count for the
    regressions. Extra keyword arguments go to DIPY (``shift_intensity``,
    ``clip_negative_vals``, ``b0_denoising``, ``version``, ...).
    """
    from dipy.denoise.patch2self import patch2self as _p2s
    from threadpoolctl import threadpool_limits

    state = np.random.get_state() if seed is not None else None
    try:
        if seed is not None:
            np.random.seed(seed)
        with threadpool_limits(limits=resolve_nprocs(nprocs)):
            out = _p2s(np.asarray(data), np.asarray(bvals, float), model=model, b0_threshold=b0_threshold,
                       out_dtype=np.float32, **kwargs)
    finally:
        if state is not None:
            np.random.set_state(state)
    return np.asarray(out, dtype=np.float32)


def denoise(data, method, bvals=None, mask=None, patch_radius=2, nprocs=1, **kwargs):
    """Dispatch: ``method`` = "mppca" | "patch2self" | "none"; float32 out.

    ``mask``: voxels outside it keep their input value (MP-PCA: inside equals
    DIPY's unmasked output, see :func:`mppca`; Patch2Self runs on the whole
    volume and the outside is then restored).
    """
    arr = np.asarray(data)
    if method == "none":
        return arr.astype(np.float32, copy=True)
    if method == "mppca":
        return mppca(arr, mask=mask, patch_radius=patch_radius, nprocs=nprocs, **kwargs)
    if method == "patch2self":
        if bvals is None:
            raise ValueError("patch2self needs bvals")
        out = patch2self(arr, bvals, nprocs=nprocs, **kwargs)
        if mask is not None:
            mask = np.asarray(mask, bool)
            out[~mask] = arr[~mask]
        return out
    raise ValueError(f"unknown denoising method {method!r}; use mppca, patch2self or none")

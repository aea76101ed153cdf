"""Head-motion and eddy-current correction: each volume registered to its own prediction.

The approach of QSIPrep's SHORELine and FSL eddy, built on DIPY:

1. Reference pose: the first b0. The other b0s are registered to it
   (rigid), averaged: the mean b0 (in the first b0's pose).
2. Rounds (``rounds``, stop early when no transform moves any head-box
   corner by more than ``converge_mm``): the volumes are aligned with the
   current transforms (for the model only), every diffusion-weighted volume
   is predicted from the *other* volumes (leave-one-out shell-wise tensor,
   ``bids_adhd.dmri.predict``: one least-squares fit per shell and the
   hat-matrix identity), then each DW volume is registered to its
   prediction and each b0 to the mean b0 — same contrast on both sides —
   with DIPY's ``AffineRegistration`` (Mattes mutual information, sparse
   sampling seeded per volume and drawn only inside the reference head grown
   by ``head_margin`` voxels, L-BFGS-B), starting from the previous round's
   result. Volumes whose estimated motion moves the head more than
   ``MOVED_MM`` are left out of the next round's fits (at most a third).
   Why (measured on a noise-free demo subject, 3 moved volumes of 33): with one
   seed for all volumes the sample points' small bias (0.02-0.06 mm) was the
   same for every volume and drifted through the predictions round after
   round; with the moved volumes in the fit, the unmoved volumes' predictions
   leaned on them (0.2-0.5 mm registration bias); and 5 iterations at full
   resolution stopped short of the optimum (max error 0.21 mm; 0.07 mm with 20).
3. Each registration is **rigid** first (6 dof: head motion, the rotation
   applied to the b-vectors, FD); with ``eddy_axis`` set (the voxel axis of
   the phase encoding), a 12-dof affine stage starts from it and its excess
   over the rigid part is projected onto an eddy-current model: a linear
   displacement along the phase-encoding axis only (one row of the voxel-
   frame matrix: scale, two shears and a translation along that axis). The
   eddy part never enters the b-vector rotation. In later rounds the rigid
   stage sees the volume with the previous eddy estimate undone (through
   the moving image's grid-to-world matrix, not a resampling). After each
   round the eddy terms are modelled across volumes (FSL eddy's ``--slm
   linear``): the PE shift (:func:`_split_pe_shift`) and, with ``eddy_model=
   "linear"``, the scale and shears (:func:`_eddy_linear_model`), each linear
   in the scanner-frame gradient per shell.
4. Slice dropouts (eddy ``--repol`` style): for every DW volume and slice
   (``slice_axis``), the relative mean residual of the volume against its
   prediction (mapped into the volume's own frame) over the head; a slice
   whose residual is more than ``outlier_z`` robust standard deviations
   below that slice's median across volumes, and at least ``outlier_min_drop``
   (a share of the predicted signal, default 0.2) below that median, is a
   dropout: the median carries the slice's usual misfit (edge slices sit
   ~10 % below their prediction in every volume), so a dropout must lose a
   fifth of the slice's signal beyond it (eddy flags on the z-score alone). Dropout volumes are left out of the
   next round's fits; ``outliers="replace"`` (default) replaces the slice by
   the prediction, ``"keep"`` leaves it, ``"drop-volume"`` removes the volume
   from the output.
5. Output: every volume resampled ONCE (trilinear) with its composed
   transform; a volume whose transform moves no head-box corner by more than
   ``identity_mm`` is copied, not resampled.
6. Moved volumes are registered without the cross-volume denoising
   (``undenoised``): MP-PCA rebuilds every patch from components shared by
   all volumes, so the denoised copy of a volume that moved keeps a faint
   image of the pose of the others, and its registration falls short of the
   motion. Measured on 4 demo subjects of the development seed 31 (data as
   denoised and unrung for the workflow's default): the moved volumes' errors
   were 0.13-0.23 mm, and each rotation and translation fell ~10 % short, on
   the same side, of the truth; registered from their undenoised (unrung)
   copies, 0.09-0.12 mm. Registering every volume undenoised is no better:
   the unmoved ones gain the noise (max 0.22 mm on one subject), hence only
   the volumes the previous round found moved (> ``MOVED_MM``).

Registration runs in a world frame centred on the image centre (rotations
about a far-away scanner origin converge badly); the affines returned are in
the real world frame.

Conventions (explicit, because they are easy to get backwards)
---------------------------------------------------------------
``affines[i]`` (4x4, mm) maps a point ``x`` in reference (first-b0 pose)
**world** coordinates to the point ``A_i x`` in volume ``i``'s world
coordinates, where the same anatomy is found; resampling reads
``moving(A_i x)``. ``A_i = E_i M_i``: ``motion_affines[i]`` = ``M_i`` the
rigid head motion (if the head moved by ``T``, ``M_i = T``: the convention
and key of the simulator's truth ``desc-motion_timeseries.json``
``Matrices``), ``eddy_affines[i]`` = ``E_i`` the eddy-current distortion in
the volume's frame (identity without the eddy stage).

``params[i]`` = ``[trans_x, trans_y, trans_z, rot_x, rot_y, rot_z]`` of
``M_i`` (mm, radians): Euler angles with ``R = Rz(rot_z) Ry(rot_y)
Rx(rot_x)``; translation = displacement of the reference image centre ``c``
(world coordinates of voxel ``(shape-1)/2``): ``M_i c - c``.

b-vectors: the diffusion gradient is fixed in the scanner; for a head rotated
by ``R`` the gradient seen by the head, i.e. in the reference frame after
resampling, is ``R^T g`` (world frame) — DIPY's ``reorient_bvecs`` applies
the same ``R^-1``. The input b-vectors follow the BIDS/FSL convention (image
axes, x flipped when the image affine has a positive determinant), so the
rotation is applied in world space: ``g_world = D F g``, ``g' = F D^T R^T D F
g`` with ``D`` the image's direction cosines and ``F = diag(-1, 1, 1)`` if
``det > 0`` else ``I``.

Framewise displacement (Power et al. 2012): ``FD_i = sum |Δtrans| + r sum
|Δrot|`` between volumes ``i-1`` and ``i`` (``r`` = ``fd_radius`` mm,
rotations in radians), ``FD_0 = 0``.
"""
from __future__ import annotations

import numpy as np

from ..config import EDDY_MODELS
from ..errors import DataError
from ._parallel import process_imap, resolve_nprocs, single_threaded_blas
from .geometry import euler_to_matrix, matrix_to_euler, polar_rotation  # noqa: F401 (the geometry helpers)

__all__ = ["correct_motion", "framewise_displacement", "rigid_params", "rotate_bvecs", "euler_to_matrix",
           "matrix_to_euler", "polar_rotation", "flag_dropouts", "eddy_projection", "max_displacement",
           "OUTLIER_ACTIONS"]


def _centre(shape3, grid2world):
    c = (np.asarray(shape3[:3], float) - 1) / 2
    return grid2world[:3, :3] @ c + grid2world[:3, 3]


def rigid_params(affines, shape3, grid2world):
    """``(N, 6)`` motion parameters of ``(N, 4, 4)`` reference→volume affines (see module doc)."""
    affines = np.asarray(affines, float).reshape(-1, 4, 4)
    c = _centre(shape3, grid2world)
    out = np.zeros((len(affines), 6))
    for i, A in enumerate(affines):
        out[i, :3] = A[:3, :3] @ c + A[:3, 3] - c
        out[i, 3:] = matrix_to_euler(polar_rotation(A))
    return out


def _frames(grid2world):
    """``(D, F)``: orthonormal direction cosines of the image axes (handedness
    kept) and the FSL x-flip (``diag(-1,1,1)`` when ``det > 0``)."""
    L = np.asarray(grid2world, float)[:3, :3]
    U, _, Vt = np.linalg.svd(L)
    D = U @ Vt
    F = np.diag([-1.0, 1.0, 1.0]) if np.linalg.det(L) > 0 else np.eye(3)
    return D, F


def rotate_bvecs(bvecs, affines, grid2world):
    """Rotate BIDS/FSL b-vectors by each volume's rotation (see module doc).

    ``bvecs`` (N, 3); ``affines`` (N, 4, 4) reference→volume world transforms;
    ``grid2world`` the image affine. Zero vectors stay zero.
    """
    bvecs = np.asarray(bvecs, float)
    D, F = _frames(grid2world)
    out = np.zeros_like(bvecs)
    for i, (g, A) in enumerate(zip(bvecs, np.asarray(affines, float).reshape(-1, 4, 4))):
        R = polar_rotation(A)
        out[i] = F @ D.T @ R.T @ D @ F @ g
    return out


def framewise_displacement(params, radius=50.0):
    """Power et al. (2012) FD (mm): ``sum|Δt| + radius * sum|Δθ|``; first volume 0."""
    p = np.asarray(params, float).reshape(-1, 6)
    fd = np.zeros(len(p))
    if len(p) > 1:
        d = np.abs(np.diff(p, axis=0))
        fd[1:] = d[:, :3].sum(1) + radius * d[:, 3:].sum(1)
    return fd


# --- registration ---------------------------------------------------------------

def _foreground(vol):
    """``vol > otsu(vol)``: the head in the reference b0 (bool array)."""
    from dipy.segment.threshold import otsu

    v = np.asarray(vol, float)
    return v > otsu(v)


def _head_box(fg, margin):
    """Slices of the bounding box of the foreground ``fg``, grown by ``margin`` voxels."""
    if not fg.any():
        return tuple(slice(0, n) for n in fg.shape)
    idx = np.nonzero(fg)
    return tuple(slice(max(0, int(i.min()) - margin), min(n, int(i.max()) + 1 + margin))
                 for i, n in zip(idx, fg.shape))


def _head_mask(fg, margin):
    """The foreground ``fg`` grown by ``margin`` voxels (the reference head, where the metric samples)."""
    from scipy.ndimage import binary_dilation

    return binary_dilation(fg, iterations=margin) if margin > 0 and fg.any() else fg


#: fewest metric sample points (full-resolution level) sparse sampling may use
MIN_SAMPLES = 40_000
#: seed of the sparse metric's sample points
MI_SEED = 12345
#: a volume whose transform moves no head-box corner further than this (mm) is copied, not resampled:
#: the registration's own scatter on still subjects (demo size, no motion, no eddy currents: up to
#: 0.14 mm at the corners with the fast preset), where a trilinear resampling only blurs, by an amount
#: that differs from volume to volume, and the blurred volumes then spoil the next round's predictions
#: (at 0.05 mm, 24-28 of 33 volumes of a still subject were resampled, and its largest displacement
#: error was 1.1-3.7x that at 0.3 mm).
#: Measured no change on moved subjects, whose DW volumes all carry eddy distortion (docs/preprocessing.md)
IDENTITY_MM = 0.3


def box_corners(box, grid2world):
    """World coordinates (8, 3) of the corners of a box of voxel slices."""
    ends = [(b.start, b.stop - 1) for b in box]
    pts = np.array([[i, j, k] for i in ends[0] for j in ends[1] for k in ends[2]], float)
    return pts @ np.asarray(grid2world, float)[:3, :3].T + np.asarray(grid2world, float)[:3, 3]


def max_displacement(A, B, points):
    """Largest distance (mm) between ``A x`` and ``B x`` over ``points`` (k, 3)."""
    h = np.c_[np.asarray(points, float), np.ones(len(points))]
    return float(np.linalg.norm(h @ (np.asarray(A, float) - np.asarray(B, float))[:3].T, axis=1).max())


def eddy_projection(E, grid2world, axis):
    """Keep of the world affine ``E`` only a displacement along voxel ``axis`` that is a
    linear function of position (the eddy-current model: one row of the voxel-frame matrix)."""
    V = np.asarray(grid2world, float)
    Ev = np.linalg.inv(V) @ np.asarray(E, float) @ V
    P = np.eye(4)
    P[axis] = Ev[axis]
    return V @ P @ np.linalg.inv(V)


def pe_direction(grid2world, axis):
    """World unit vector of voxel ``axis`` (the phase-encoding direction)."""
    v = np.asarray(grid2world, float)[:3, axis]
    return v / np.linalg.norm(v)


def rigid_part(A, M_rigid, u, centre):
    """The rigid motion ``M`` of ``A = E M`` when ``E`` only displaces along ``u`` (eddy model).

    The rows of ``A`` orthogonal to ``u`` are those of ``M`` (rotation: completed by their cross
    product, the nearest rotation kept; translation orthogonal to ``u``). The translation along
    ``u`` cannot be told from an eddy shift by one volume: it is taken from ``M_rigid`` (the
    rigid stage) for now; :func:`_split_pe_shift` replaces it after the round, across volumes.
    """
    a = np.cross(u, [1.0, 0, 0] if abs(u[0]) < 0.9 else [0, 1.0, 0])
    a /= np.linalg.norm(a)
    b = np.cross(u, a)
    Q = np.column_stack([a, b, u])                       # right-handed: a x b = u
    L = np.asarray(A, float)[:3, :3]
    K = np.vstack([a @ L, b @ L, np.cross(a @ L, b @ L)])
    R = Q @ polar_rotation(K)
    t = np.asarray(A, float)[:3, 3]
    t = t - u * (u @ t)
    shift_rigid = u @ (M_rigid[:3, :3] @ centre + M_rigid[:3, 3] - centre)
    t = t + u * (shift_rigid - u @ (R @ centre + t - centre))
    M = np.eye(4)
    M[:3, :3], M[:3, 3] = R, t
    return M


def _split_pe_shift(A, M, bvals, bvecs, grid2world, axis, b0_threshold, centre):
    """Model the DW volumes' displacements along the phase-encoding direction ``u`` across volumes:
    ``T_i = c0 + (b_i g_i) . s`` (``T_i`` the shift of the centre along ``u`` in the composed ``A_i``,
    ``g`` the scanner-frame gradient; robust least squares, two passes, volumes beyond 3 robust SDs
    dropped: moved ones). The part linear in ``b g`` is the eddy shift (``E = A M^-1`` takes it); what
    the model leaves of ``T_i`` is the volume's head motion along ``u`` (``M_i``'s shift set to it).
    One volume cannot tell a head shift along ``u`` from an eddy shift (FSL eddy's ``--slm linear``
    decides the same way: the eddy terms follow the gradient model, the rest is movement). Why
    the composed shift and not the rigid stage's: on demo subjects simulated without motion or eddy
    currents the rigid stage's shift scattered by up to 0.064 mm along ``u`` (0.010 mm from ``A``),
    and on four moved development subjects (seed 31) the rigid error fell from 0.14-0.26 mm to
    0.12-0.19 mm (docs/preprocessing.md). The intercept ``c0`` is a displacement shared by every DW
    volume and none of the b0s: eddy currents vanish without a gradient, and a head does not move
    with the diffusion weighting, so it is the pose of the registration targets (each DW volume is
    registered to a prediction from the other DW volumes, which share it; FSL eddy's post-eddy
    alignment of shells corrects the same blind spot): removed from every DW volume's ``M`` and
    ``A``. Returns ``(A, M, c0)``."""
    u = pe_direction(grid2world, axis)
    dw = np.flatnonzero(np.asarray(bvals) > b0_threshold)
    if dw.size < 6:
        return A, M, 0.0
    G = _scanner_bg(bvals, bvecs, grid2world, dw)

    def shift(X):                                                     # of the centre, along u
        return u @ (X[:3, :3] @ centre + X[:3, 3] - centre)

    coef = _robust_linear_fit(G, np.array([shift(A[i]) for i in dw]), mad_floor=0.02)
    A, M = A.copy(), M.copy()
    for i, g in zip(dw, G):
        M[i][:3, 3] += u * float(shift(A[i]) - coef[0] - g @ coef[1:] - shift(M[i]))
        A[i][:3, 3] -= u * float(coef[0])
    return A, M, float(coef[0])


def _scanner_bg(bvals, bvecs, grid2world, idx):
    """(len(idx), 3): the scanner-frame gradient of volumes ``idx`` scaled by ``b / 1000`` (BIDS/FSL
    b-vectors in, see the module doc's frames)."""
    D, F = _frames(grid2world)
    return (np.asarray(bvecs, float)[idx] @ (D @ F).T) * (np.asarray(bvals, float)[idx, None] / 1000.0)


def _robust_linear_fit(G, y, mad_floor):
    """``[c0, s]`` of ``y ~ c0 + G s`` by least squares in two passes, the second without the rows
    more than 3 robust SDs (1.4826 MAD, at least ``mad_floor``) from the median residual."""
    X = np.c_[np.ones(len(y)), G]
    keep = np.ones(len(y), bool)
    for _ in range(2):
        coef = np.linalg.lstsq(X[keep], y[keep], rcond=None)[0]
        r = y - X @ coef
        mad = 1.4826 * np.median(np.abs(r - np.median(r)))
        keep = np.abs(r - np.median(r)) <= 3 * max(mad, mad_floor)
    return coef


def _eddy_linear_model(A, M, bvals, bvecs, grid2world, axis, b0_threshold, shape3):
    """FSL eddy's second-level model (``--slm linear``) for the eddy scale and shears: per shell,
    each of the three linear terms of the eddy displacement along the phase-encoding axis (voxel
    frame: row ``axis``, columns 0-2 of ``E_i = A_i M_i^-1``) is regressed on the scanner-frame
    gradient ``b_i g_i`` (robust least squares, two passes, volumes beyond 3 robust SDs left out
    of the fit) and replaced by its fitted value, with the displacement at the image centre kept
    (the translation is modelled by :func:`_split_pe_shift`). The intercept (a term shared by every
    DW volume of the shell and no b0) is dropped, as there: eddy fields scale with the gradient.

    Why: each volume is registered to a prediction made from the *other* volumes as the current
    estimates align them; per-volume errors in those estimates blur the prediction's edges along
    the phase-encoding axis, and a volume registered to a blurred target underestimates its
    stretch (measured: a fixed point at slope 0.85-0.89 of the true PE scale, round after round,
    on a noise-free subject without motion; 1.00 when the others are aligned by the truth or by
    the truth times 0.85, i.e. the attenuation comes from the per-volume scatter, not the
    size). The model removes the scatter. Shells with fewer than 8 DW volumes keep their
    per-volume estimates. Returns ``A`` (new array)."""
    from .predict import shells

    V = np.asarray(grid2world, float)
    Vi = np.linalg.inv(V)
    A = np.array(A, float, copy=True)
    c = (np.asarray(shape3[:3], float) - 1) / 2                # image centre, voxels
    for s in shells(bvals, b0_threshold):
        if s.size < 8:
            continue
        G = _scanner_bg(bvals, bvecs, grid2world, s)
        Ev = np.array([Vi @ A[i] @ np.linalg.inv(M[i]) @ V for i in s])
        lin = Ev[:, axis, :3] - np.eye(3)[axis]                    # (n, 3): the scale and shears
        fit = np.column_stack([G @ _robust_linear_fit(G, lin[:, k], mad_floor=1e-6)[1:] for k in range(3)])
        for j, i in enumerate(s):
            P = Ev[j].copy()
            P[axis, :3] = np.eye(3)[axis] + fit[j]
            P[axis, 3] = Ev[j][axis, 3] + (lin[j] - fit[j]) @ c      # same displacement at the centre
            A[i] = V @ P @ Vi @ M[i]
    return A


def _seed(volume):
    """The sparse metric's seed for one volume: its own sample points, so that the small bias a
    fixed point set gives (~0.02-0.06 mm, measured on noise-free data) differs between volumes
    instead of shifting all of them the same way, round after round, through the prediction."""
    return [MI_SEED, int(volume)]


def _amap(A, shape, grid2world):
    from dipy.align.imaffine import AffineMap

    return AffineMap(A, domain_grid_shape=shape, domain_grid2world=grid2world, codomain_grid_shape=shape,
                     codomain_grid2world=grid2world)


def _optimise(st, mv, g_st, g_mv, tf, start, sched, seed=MI_SEED, head=None):
    """One DIPY ``AffineRegistration`` run (mutual information, sparse sampling seeded with ``seed``;
    ``head``: a bool mask on the static grid, the only voxels sparse sampling draws points from)."""
    from dipy.align.imaffine import AffineRegistration

    from ._mi import seeded_mi_metric

    level_iters, factors, sigmas, nbins, sampling, min_samples = sched
    if sampling is not None:
        # never fewer than min_samples points at full resolution: on small images a sparse
        # metric is too noisy
        n = st.size if head is None else max(1, int(np.count_nonzero(head)))
        sampling = max(float(sampling), min(1.0, min_samples / n))
    sparse = sampling is not None and sampling < 1
    mask = (head, g_st) if sparse and head is not None else None
    reg = AffineRegistration(metric=seeded_mi_metric(seed, nbins, sampling if sparse else None, mask),
                             level_iters=list(level_iters), sigmas=list(sigmas), factors=list(factors),
                             verbosity=0)
    return np.asarray(reg.optimize(st, mv, tf, None, static_grid2world=g_st, moving_grid2world=g_mv,
                                   starting_affine=start).affine, float)


def _register_one(task):
    """Worker: register one volume to its target (rigid, then the optional eddy stage).

    ``task[13]``: the volume to resample with the result when the registration's ``moving`` is
    another copy of it (None: ``moving`` itself) (the undenoised volume of a moved volume, see
    :func:`correct_motion`).

    Returns ``(A, M, aligned, slice_stats)``: the composed and the rigid
    reference→volume affines (world), the volume resampled with ``A`` (a copy
    when ``A`` is the identity within ``identity_mm`` on the head box), and
    per slice the relative mean residual against the target in the volume's
    frame and the number of head voxels it covers, of ``observed`` (the volume before any slice
    replacement; None: no statistics).
    """
    (static, moving, grid2world, box, sched, M0, E0, eddy_axis, identity_mm, slice_axis, observed, seed, head,
     output) = task
    output = moving if output is None else output                                 # the volume resampled
    from dipy.align.transforms import AffineTransform3D, RigidTransform3D

    c = _centre(moving.shape, grid2world)
    to_c, back = np.eye(4), np.eye(4)
    to_c[:3, 3], back[:3, 3] = -c, c
    lo = np.eye(4)
    lo[:3, 3] = [b.start for b in box]
    st = np.ascontiguousarray(static[box], dtype=np.float64)
    mv = np.ascontiguousarray(moving[box], dtype=np.float64)
    g_st = to_c @ grid2world @ lo
    with single_threaded_blas():
        # rigid: the volume seen with the previous eddy estimate undone (through its grid-to-world)
        g_mv = to_c @ np.linalg.inv(E0) @ grid2world @ lo
        M = back @ _optimise(st, mv, g_st, g_mv, RigidTransform3D(), to_c @ M0 @ back, sched, seed, head) @ to_c
        A = M
        corners = box_corners(box, grid2world)
        if max_displacement(M, M0, corners) > MAX_STEP_MM:
            M, A = M0, E0 @ M0          # a diverged optimisation: keep the previous round's estimate
        elif eddy_axis is not None:
            full = back @ _optimise(st, mv, g_st, g_st, AffineTransform3D(), to_c @ E0 @ M @ back, sched,
                                       seed, head) @ to_c
            M_e = rigid_part(full, M, pe_direction(grid2world, eddy_axis), c)
            A_e = eddy_projection(full @ np.linalg.inv(M_e), grid2world, eddy_axis) @ M_e
            if max_displacement(A_e, E0 @ M0, corners) <= MAX_STEP_MM:
                M, A = M_e, A_e
        out = _resample(output, A, grid2world, corners, identity_mm)
        slice_stats = None if observed is None else _slice_residuals(
            observed, _amap(A, moving.shape, grid2world).transform_inverse(np.asarray(static, np.float64)),
            slice_axis)
    return A, M, out, slice_stats


def _slice_residuals(observed, predicted, axis):
    """Per slice: mean(observed - predicted) / mean(predicted) over the head (predicted above
    10 % of its 99th percentile) and the number of head voxels."""
    p = np.asarray(predicted, np.float64)
    head = p > 0.1 * np.percentile(p, 99)
    ax = tuple(a for a in range(3) if a != axis)
    n = head.sum(axis=ax)
    po = np.where(head, p, 0).sum(axis=ax)
    ob = np.where(head, np.asarray(observed, np.float64), 0).sum(axis=ax)
    return np.where(po > 0, (ob - po) / np.maximum(po, 1e-9), 0.0), n


def flag_dropouts(resid, counts, dw, z=4.0, min_drop=0.2, min_voxels=50, min_area=0.2):
    """(N, S) bool: slices whose relative residual is ``z`` robust SDs below that slice's
    median over the DW volumes ``dw`` and at least ``min_drop`` (a share of the prediction)
    below that median, among the slices covering at least ``min_area`` of the largest slice's
    head voxels.

    The drop is measured from the slice's median, not from 0: edge slices' residuals sit below
    0 in every volume (there the prediction misfits), and with a 4-SD test over ~2,000 slices a
    noisy volume's edge slice 14-18 % below its prediction, 9-11 % below its usual level, passed
    as a dropout (min_drop 0.1 from 0, seed-12 demo subject 06); a real dropout loses far more
    (the simulator plants 50-95 % losses, DROPOUT_SIGNAL)."""
    flags = np.zeros(resid.shape, bool)
    r = resid[dw]
    med = np.median(r, axis=0)
    mad = 1.4826 * np.median(np.abs(r - med), axis=0)
    score = (r - med) / np.maximum(mad, 1e-6)
    big = counts[dw] >= max(min_voxels, min_area * counts.max())     # edge slices: partial volume dominates
    flags[dw] = (score < -z) & (r - med < -min_drop) & big
    return flags


#: what happens to a volume with dropout slices
OUTLIER_ACTIONS = ("replace", "keep", "drop-volume")


def correct_motion(data, affine, bvals, bvecs, b0_threshold=50, level_iters=(100, 20), factors=(2, 1),
                   sigmas=(1.0, 0.0), nprocs=1, *, rounds=2, eddy_axis=None, slice_axis=2, outliers="replace",
                   outlier_z=4.0, outlier_min_drop=0.2, nbins=32, fd_radius=50.0, box_margin=8, sampling=0.25,
                   min_samples=MIN_SAMPLES, identity_mm=IDENTITY_MM, converge_mm=0.05, median_start=True,
                   head_margin=3, eddy_model="linear", undenoised=None):
    """Register every volume to its leave-one-out prediction (b0s to the mean b0), rigid then
    optionally eddy, replace dropout slices, resample once, rotate the b-vectors (module doc).

    ``data`` (X, Y, Z, N); ``affine`` the image affine; ``bvals`` (N,); ``bvecs`` (N, 3) BIDS/FSL.
    ``level_iters``/``factors``/``sigmas``: DIPY's multi-resolution schedule (coarse → fine), every
    stage; ``sampling``/``min_samples``: share of the head box's voxels the metric samples (seeded),
    never fewer than ``min_samples`` points (``None`` or 1: dense); ``nprocs`` worker processes.
    ``rounds``: predict-register rounds (fewer when no head-box corner moves more than
    ``converge_mm`` between two rounds). ``eddy_axis``: voxel axis of the phase encoding (None: no
    eddy stage). ``eddy_model``: "linear" (after each round, the eddy scale and shears of each
    shell's volumes replaced by a fit linear in the gradient, :func:`_eddy_linear_model`) or
    "none" (per-volume estimates). ``slice_axis``: the acquisition's slice axis; ``outliers``: replace | keep |
    drop-volume, with ``outlier_z`` and ``outlier_min_drop`` (see :func:`flag_dropouts`).
    ``identity_mm``: a volume whose transform moves no head-box corner further is not resampled.
    ``head_margin``: the sparse metric samples only the first b0's head (above Otsu) grown by this
    many voxels, ``min_samples`` counted there (None: the whole head box). Background points carry
    no gradient; on demo subjects the head is ~35 % of the box.
    ``undenoised``: a function ``i -> (X, Y, Z)`` array: volume ``i`` before the cross-volume
    denoising (the per-volume steps, e.g. Gibbs unringing, done); in the rounds after the first, a
    volume whose head motion moves a head-box corner more than ``MOVED_MM`` is registered with that
    copy, its dropout slices replaced (called at most once per volume: the moved ones and those
    with dropout slices; the output still resamples ``data``; why: module doc, 6.).

    Returns a dict: ``data`` (float32; without the dropped volumes for "drop-volume"), ``bvecs``
    (rigid rotation only), ``kept`` (indices of the input volumes in ``data``), ``affines`` (N, 4, 4)
    composed reference→volume transforms, ``motion_affines`` (rigid part), ``eddy_affines``,
    ``params`` (N, 6), ``fd`` (N,), ``dropouts`` (N, slices) bool, ``resampled`` (N,) bool,
    ``rounds`` (rounds run), ``reference`` (mean b0).
    """
    arr, bvals, bvecs, b0s = _check_inputs(data, bvals, bvecs, b0_threshold, outliers)
    if eddy_model not in EDDY_MODELS:
        raise ValueError(f"eddy_model must be one of {', '.join(EDDY_MODELS)} (got {eddy_model!r})")
    affine = np.asarray(affine, float)
    n = bvals.size
    first = np.asarray(arr[..., b0s[0]], np.float32)
    fg = _foreground(first)
    box = _head_box(fg, box_margin) if box_margin is not None else tuple(slice(0, k) for k in first.shape)
    box_mask = np.zeros(first.shape, bool)
    box_mask[box] = True
    head = None if head_margin is None else _head_mask(fg, int(head_margin))[box]
    st = dict(raw=arr, replaced={}, undenoised=undenoised, undenoised_cache={}, undenoised_replaced={},
              bvals=bvals, bvecs=bvecs, b0s=b0s, affine=affine, box=box, box_mask=box_mask,
              head=head, corners=box_corners(box, affine), b0_threshold=float(b0_threshold), eddy_axis=eddy_axis,
              eddy_model=eddy_model, slice_axis=int(slice_axis), identity_mm=float(identity_mm), outlier_z=float(outlier_z),
              outlier_min_drop=float(outlier_min_drop),
              sched=(tuple(level_iters), tuple(factors), tuple(sigmas), nbins, sampling, int(min_samples)))
    nprocs = resolve_nprocs(nprocs)
    # the registration code imported here, before the worker pools fork: the workers share its pages
    # instead of each importing it privately (~100 MB per worker measured at HBN size)
    import dipy.align.imaffine  # noqa: F401
    import dipy.align.transforms  # noqa: F401

    from . import _mi  # noqa: F401
    A, M = np.repeat(np.eye(4)[None], n, 0), np.repeat(np.eye(4)[None], n, 0)
    aligned = np.array(arr, np.float32)           # written in place, round after round
    _b0s_to_first(st, A, M, aligned, nprocs)
    flags = applied = np.zeros((n, arr.shape[st["slice_axis"]]), bool)
    applied = applied.copy()
    done = 0
    for r in range(max(1, int(rounds))):
        A_prev = A
        A, M, aligned, flags, pred = _round(st, aligned, A, M, flags, nprocs, first=(r == 0 and median_start and rounds > 1))
        done += 1
        if outliers == "replace":
            _apply_outliers(st, aligned, A, flags, applied, pred)
        del pred          # the next round's prediction is made while this one would still be held (730 MB at HBN size)
        if done > 1 and max(max_displacement(a, b, st["corners"]) for a, b in zip(A, A_prev)) <= converge_mm:
            break
    kept = np.flatnonzero(~flags.any(1)) if outliers == "drop-volume" else np.arange(n)
    params = rigid_params(M, arr.shape[:3], affine)
    resampled = np.array([max_displacement(a, np.eye(4), st["corners"]) > identity_mm for a in A])
    return dict(data=aligned[..., kept] if kept.size < n else aligned, bvecs=rotate_bvecs(bvecs, M, affine)[kept],
                kept=kept, affines=A, motion_affines=M, eddy_affines=np.stack([a @ np.linalg.inv(m) for a, m in zip(A, M)]),
                params=params, fd=framewise_displacement(params, fd_radius), dropouts=flags,
                resampled=resampled, rounds=done, reference=aligned[..., b0s].mean(-1))


def _check_inputs(data, bvals, bvecs, b0_threshold, outliers):
    from .mask import mean_b0

    arr = np.asarray(data)
    bvals = np.asarray(bvals, float).ravel()
    bvecs = np.asarray(bvecs, float)
    if bvecs.shape == (3, bvals.size) and bvals.size != 3:
        bvecs = bvecs.T
    if arr.ndim != 4 or arr.shape[3] != bvals.size or bvecs.shape != (bvals.size, 3):
        raise DataError(f"data {arr.shape}, {bvals.size} b-values and b-vectors {bvecs.shape} do not match")
    if outliers not in OUTLIER_ACTIONS:
        raise ValueError(f"outliers must be one of {', '.join(OUTLIER_ACTIONS)} (got {outliers!r})")
    b0s = np.flatnonzero(bvals <= b0_threshold)
    if b0s.size == 0:
        mean_b0(arr, bvals, b0_threshold)            # raises the DataError
    return arr, bvals, bvecs, b0s


def _replace_slices(raw, pred_ref, A, flags, axis, grid2world):
    """``raw`` (one volume, its own frame) with its flagged slices replaced by the prediction
    (reference frame, mapped into the volume's frame with ``A``)."""
    out = np.array(raw, np.float32, copy=True)
    if flags.any():
        native = _amap(A, raw.shape, grid2world).transform_inverse(np.asarray(pred_ref, np.float64))
        idx = [slice(None)] * 3
        idx[axis] = np.flatnonzero(flags)
        out[tuple(idx)] = native[tuple(idx)]
    return out


def _shell_medians(aligned, bvals, b0_threshold, mask, slab_voxels=None):
    """Every DW volume's voxel-wise median over its shell (robust to a few moved volumes), in
    slabs of whole planes along the first axis (memory: the whole head box at once is a
    (voxels, N) copy per shell); voxels outside ``mask`` are never written."""
    from .predict import SLAB_VOXELS, shells, voxel_slabs

    out = np.zeros(aligned.shape, np.float32)
    groups = shells(bvals, b0_threshold)
    for sl, ms in voxel_slabs(mask, slab_voxels or SLAB_VOXELS):
        vox = aligned[sl][ms]                                   # (V, N)
        o = np.zeros(vox.shape, np.float32)
        for s in groups:
            o[:, s] = np.median(vox[:, s], axis=1)[:, None]
        out[sl][ms] = o
    return out


def _round(st, aligned, A, M, flags, nprocs, first=False):
    """One round: predict every volume from the others, register each to its prediction
    (b0s to the mean b0), find dropout slices. ``st`` holds the fixed inputs (a dict).
    ``first``: the targets are the shells' voxel-wise medians instead (see the module doc)."""
    from .predict import loo_predict

    bvals, b0s, n = st["bvals"], st["b0s"], st["bvals"].size
    if first:
        pred = _shell_medians(aligned, bvals, st["b0_threshold"], st["box_mask"])
    else:
        exclude = flags.any(1)
        moved = _moved(M, bvals, st["b0_threshold"], st["corners"])
        if np.count_nonzero((bvals > st["b0_threshold"]) & ~(exclude | moved)) >= MIN_FIT_DW:
            exclude = exclude | moved
        rot = rotate_bvecs(st["bvecs"], M, st["affine"])
        pred = loo_predict(aligned, bvals, rot, st["b0_threshold"], mask=st["box_mask"], exclude=exclude)
    ref_b0 = aligned[..., b0s].mean(-1)
    tasks, todo = [], [i for i in range(n) if i != b0s[0]]     # the first b0 is the reference pose
    for i in todo:
        dw = bvals[i] > st["b0_threshold"]
        vol, out = _volume(st, i), None
        if st["undenoised"] is not None and not first and max_displacement(M[i], np.eye(4), st["corners"]) > MOVED_MM:
            vol, out = _undenoised(st, i), vol                                   # see correct_motion
        tasks.append((pred[..., i] if dw else ref_b0, vol, st["affine"], st["box"], st["sched"],
                      M[i], A[i] @ np.linalg.inv(M[i]), st["eddy_axis"] if dw else None, st["identity_mm"],
                      st["slice_axis"], st["raw"][..., i] if dw else None, _seed(i), st["head"], out))
    A, M = A.copy(), M.copy()
    n_sl = aligned.shape[st["slice_axis"]]
    resid, counts = np.zeros((n, n_sl)), np.zeros((n, n_sl), int)
    for i, r in zip(todo, process_imap(_register_one, tasks, nprocs)):     # aligned: written in place
        A[i], M[i], aligned[..., i] = r[0], r[1], r[2]
        if r[3] is not None:
            resid[i], counts[i] = r[3]
    c0 = 0.0
    modelled = st["eddy_axis"] is not None and st["eddy_model"] == "linear"
    if modelled:
        A = _eddy_linear_model(A, M, bvals, st["bvecs"], st["affine"], st["eddy_axis"], st["b0_threshold"],
                               aligned.shape[:3])
    if st["eddy_axis"] is not None:
        A, M, c0 = _split_pe_shift(A, M, bvals, st["bvecs"], st["affine"], st["eddy_axis"], st["b0_threshold"],
                                   _centre(aligned.shape[:3], st["affine"]))
    dw = np.flatnonzero(bvals > st["b0_threshold"])
    if c0 != 0.0 or modelled:           # the DW volumes' transforms moved: resample them anew
        for i in dw:
            aligned[..., i] = _resample(_volume(st, i), A[i], st["affine"], st["corners"], st["identity_mm"])
    new_flags = flag_dropouts(resid, counts, dw, st["outlier_z"], st["outlier_min_drop"])
    return A, M, aligned, new_flags, pred


#: one registration may move a head-box corner at most this far (mm) from where the previous round
#: (or the identity) put it; further is a diverged optimisation (seen: a 106 degree rotation of a
#: 12-direction volume), and the previous estimate is kept
MAX_STEP_MM = 40.0
#: a volume whose estimated head motion moves a head-box corner further than this (mm) is kept out
#: of the next round's model fits (still predicted and registered)
MOVED_MM = 0.5
#: ... but only while at least this many DW volumes stay in the fit: twice the tensor's 7 parameters
#: plus the one a leave-one-out prediction leaves out. With 12 directions, 2 dropout volumes and 4
#: moved ones left 6, an under-determined fit whose predictions sent the registrations astray
#: (mean FD 85 mm on tests/test_participant_e2e.py's subject 01)
MIN_FIT_DW = 15


def _moved(M, bvals, b0_threshold, corners, limit=MOVED_MM, share=1 / 3):
    """(N,) bool: the DW volumes whose rigid motion ``M`` moves the head more than ``limit`` mm, at
    most ``share`` of them (the largest). A volume that moved enters the next fit only through its
    interpolated, not yet exactly aligned copy: measured on noise-free demo data, 3 moved volumes
    of 33 in the fit bias the registration of unmoved volumes to their predictions by 0.2-0.5 mm
    (a volume's leave-one-out prediction leans on its neighbours in q-space)."""
    dw = np.flatnonzero(np.asarray(bvals) > b0_threshold)
    d = np.array([max_displacement(M[i], np.eye(4), corners) for i in dw])
    out = np.zeros(len(bvals), bool)
    largest = np.argsort(-d)[:int(share * dw.size)]
    out[dw[largest]] = d[largest] > limit
    return out


def _b0s_to_first(st, A, M, aligned, nprocs):
    """Register the other b0s to the first b0 (rigid): the mean b0 is then in the first b0's pose."""
    b0s = st["b0s"]
    first = _volume(st, b0s[0])
    eye = np.eye(4)
    tasks = [(first, _volume(st, i), st["affine"], st["box"], st["sched"], eye, eye, None, st["identity_mm"],
              st["slice_axis"], None, _seed(i), st["head"], None) for i in b0s[1:]]
    for i, r in zip(b0s[1:], process_imap(_register_one, tasks, nprocs)):
        A[i], M[i], aligned[..., i] = r[0], r[1], r[2]


def _undenoised(st, i, replaced=True):
    """Volume ``i`` before the cross-volume denoising (``st["undenoised"](i)``, read once per volume),
    with its dropout slices replaced as in :func:`_volume` (``replaced=False``: as read)."""
    if replaced and i in st["undenoised_replaced"]:
        return st["undenoised_replaced"][i]
    cache = st["undenoised_cache"]
    if i not in cache:
        vol = np.asarray(st["undenoised"](i), np.float32)
        if vol.shape != st["raw"].shape[:3]:
            raise DataError(f"undenoised volume {i} has shape {vol.shape}, the data {st['raw'].shape[:3]}")
        cache[i] = vol
    return cache[i]


def _volume(st, i):
    """Volume ``i`` as registered and resampled (float32): the input volume, or its copy with the
    dropout slices replaced (``st["replaced"]``; only those volumes are copied, not the series)."""
    vol = st["replaced"].get(i)
    return np.asarray(st["raw"][..., i], np.float32) if vol is None else vol


def _apply_outliers(st, aligned, A, flags, applied, pred):
    """Replace the dropout slices of this round's flags with this round's prediction (volumes with
    flags, or whose flags changed, are rebuilt from the raw volume and resampled once)."""
    for i in np.flatnonzero((flags != applied).any(1) | flags.any(1)):
        vol = _replace_slices(st["raw"][..., i], pred[..., i], A[i], flags[i], st["slice_axis"], st["affine"])
        if flags[i].any():
            st["replaced"][i] = vol
            if st["undenoised"] is not None:     # its undenoised copy, should it be registered from it
                st["undenoised_replaced"][i] = _replace_slices(_undenoised(st, i, replaced=False), pred[..., i],
                                                               A[i], flags[i], st["slice_axis"], st["affine"])
        else:                                    # flags withdrawn: the input volume again
            st["replaced"].pop(i, None)
            st["undenoised_replaced"].pop(i, None)
        applied[i] = flags[i]
        aligned[..., i] = _resample(vol, A[i], st["affine"], st["corners"], st["identity_mm"])


def _resample(vol, A, grid2world, corners, identity_mm):
    """``vol`` resampled (trilinear, float32) with the reference->volume transform ``A``; a copy when
    ``A`` moves none of the head-box ``corners`` further than ``identity_mm``."""
    if max_displacement(A, np.eye(4), corners) <= identity_mm:
        return np.asarray(vol, np.float32).copy()
    return np.asarray(_amap(A, vol.shape, grid2world).transform(np.asarray(vol, np.float64)), np.float32)

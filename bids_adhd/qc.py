"""QC numbers of one DWI run (``qc_metrics``), computed from plain arrays.

Defined in ``docs/qc.md``; the sink's QC step calls this module, the HTML report
(``reports.participant``) only shows its results. In short:

* motion: Power et al. (2012) framewise displacement (FD) of the rigid
  head-motion parameters of the motion step (each volume registered to its
  leave-one-out model prediction), rotations on a sphere of ``fd_radius_mm``,
  its mean and max, the number of volumes with FD above ``fd_outlier_mm``, the
  slice dropouts found and the volumes resampled;
* SNR: mean of the mean-b0 image inside the brain mask divided by the noise
  σ of a single DWI volume (MP-PCA's σ when given, else estimated from the
  image background assuming Rayleigh-distributed magnitude noise, see
  ``background_sigma``);
* the brain-mask volume, FA/MD summaries in the whole mask and in
  "white-matter-like" voxels (FA > 0.2), the registration similarity
  (Pearson correlation of template target and template-space FA inside the
  template brain mask).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

WM_FA_THRESHOLD = 0.2
"""FA above this (inside the brain mask) counts as white-matter-like."""

BG_MARGIN_MM = 10.0
"""Background for the noise estimate: farther than this from the brain mask."""

MIN_BG_VOXELS = 500


# --- numbers -------------------------------------------------------------------

def framewise_displacement(params, radius_mm: float = 50.0) -> np.ndarray:
    """Power et al. (2012) FD per volume: Σ|Δtranslation| + r·Σ|Δrotation (rad)|; FD[0] = 0.

    The same function the motion-correction step uses (``bids_adhd.dmri.motion``).
    """
    from .dmri.motion import framewise_displacement as _fd

    return np.asarray(_fd(np.asarray(params, float).reshape(-1, 6), radius=radius_mm), float)


def background_sigma(image, mask, voxel_size, margin_mm: float = BG_MARGIN_MM) -> tuple[float | None, int]:
    """Noise σ from the image background, assuming Rayleigh magnitude noise.

    Background = voxels farther than ``margin_mm`` from the brain mask with a
    finite, non-zero value (exact zeros are scanner or resampling padding, not
    noise). For a magnitude image of pure noise (single-channel receiver) the
    values are Rayleigh(σ) with median σ·√(2 ln 2); the median is robust to
    ghosts and to the odd bright artefact. Averaging several b0 volumes does
    not change the mean and barely changes the median of the background, so
    this estimates the noise σ of *one* volume even from a mean-b0 image.
    Multi-channel (non-central χ) or parallel-imaging data bias it upward
    (SNR downward): it is a conservative estimate. Returns ``(σ, n_voxels)``;
    σ is None when fewer than ``MIN_BG_VOXELS`` background voxels exist.
    """
    from scipy import ndimage

    img = np.asarray(image, float)
    m = np.asarray(mask, bool)
    vox = np.asarray(voxel_size, float)[:3]
    dist = ndimage.distance_transform_edt(~m, sampling=vox) if m.any() else np.full(m.shape, np.inf)
    bg = (dist > margin_mm) & np.isfinite(img) & (img != 0)
    n = int(bg.sum())
    if n < MIN_BG_VOXELS:
        return None, n
    return float(np.median(np.abs(img[bg])) / math.sqrt(2 * math.log(2))), n


def _voxel_sizes(voxel_size) -> np.ndarray:
    v = np.asarray(voxel_size, float)
    if v.shape == (4, 4):
        return np.sqrt((v[:3, :3] ** 2).sum(0))
    if v.size < 3:
        raise ValueError("voxel_size must give 3 sizes (mm) or be a 4×4 affine")
    return v.ravel()[:3]


def _f(x) -> float | None:
    """A finite float, or None (JSON has no NaN)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def qc_metrics(mean_b0, mask, fa, md, params, fd=None, fd_outlier_mm: float = 0.5, voxel_size=None,
               reg_similarity=None, noise_sigma=None, fd_radius_mm: float = 50.0, dropout_slices=None,
               resampled=None) -> dict[str, Any]:
    """QC numbers of one DWI run (all JSON-serialisable; NaN becomes None).

    Parameters
    ----------
    mean_b0, mask, fa, md : 3D arrays in native space (MD in mm²/s).
    params : (N, 6) motion parameters trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z (rad).
    fd : (N,) framewise displacement (mm); computed from ``params`` (Power, radius
        ``fd_radius_mm``) when None.
    fd_outlier_mm : a volume with FD strictly above this is an outlier.
    voxel_size : 3 voxel sizes in mm, or the 4×4 affine (required).
    reg_similarity : template-registration similarity (``register_to_template``'s).
    noise_sigma : noise σ of one volume (e.g. MP-PCA's: a scalar, or a map whose
        median inside the mask is used); NaN/None → background estimate.
    dropout_slices : [(volume, slice)] found by the motion step (None: not run).
    resampled : (N,) 0/1 per volume, whether the motion step resampled it.
    """
    if voxel_size is None:
        raise ValueError("qc_metrics needs voxel_size (3 sizes in mm or the 4×4 affine)")
    vox = _voxel_sizes(voxel_size)
    mask = np.asarray(mask) > 0
    b0 = np.asarray(mean_b0, float)
    params = np.asarray(params, float).reshape(-1, 6)
    fd = framewise_displacement(params, fd_radius_mm) if fd is None else np.asarray(fd, float).ravel()
    n_mask = int(mask.sum())
    voxel_ml = float(np.prod(vox)) / 1000.0
    signal = float(np.mean(b0[mask])) if n_mask else float("nan")
    sigma, method, n_bg = _noise(b0, mask, vox, noise_sigma)
    snr = signal / sigma if sigma and sigma > 0 else None
    out = {
        **_motion_qc(params, fd, fd_outlier_mm),
        "snr": _f(snr),
        "snr_method": method,
        "noise_sigma": _f(sigma),
        "mean_b0_in_mask": _f(signal),
        "mask_volume_ml": n_mask * voxel_ml,
        "mask_voxels": n_mask,
        "voxel_size_mm": [float(v) for v in vox],
        "registration_similarity": _f(reg_similarity),
        **_tissue_qc(np.asarray(fa, float), np.asarray(md, float), mask, voxel_ml),
    }
    out.update(_motion_step_qc(fd_radius_mm, dropout_slices, resampled))
    if n_bg is not None:
        out["noise_background_voxels"] = n_bg
    return out


def _noise(b0, mask, vox, noise_sigma) -> tuple:
    """(σ, method, background voxels or None): the given σ (its median in the mask), else the background's."""
    sigma, method, n_bg = None, None, None
    if noise_sigma is not None:
        s = np.asarray(noise_sigma, float)
        if s.ndim == 3 and s.shape == mask.shape:
            s = s[mask]
        s = s[np.isfinite(s) & (s > 0)]
        if s.size:
            sigma, method = float(np.median(s)), "mppca"
    if sigma is None:
        sigma, n_bg = background_sigma(b0, mask, vox)
        method = "background-rayleigh" if sigma is not None else "unavailable"
    return sigma, method, n_bg


def _motion_qc(params, fd, fd_outlier_mm: float) -> dict:
    """FD summary and outlier volumes, the largest translation and rotation."""
    fd_valid = np.nan_to_num(fd, nan=0.0)
    outliers = np.flatnonzero(fd_valid > fd_outlier_mm)
    return {
        "n_volumes": int(len(fd)),
        "fd_threshold_mm": float(fd_outlier_mm),
        "mean_fd": _f(np.mean(fd_valid)) if len(fd) else None,
        "max_fd": _f(np.max(fd_valid)) if len(fd) else None,
        "n_outlier_volumes": int(len(outliers)),
        "outlier_volumes": [int(i) for i in outliers],
        "max_abs_translation_mm": _f(np.abs(params[:, :3]).max()) if len(params) else None,
        "max_abs_rotation_deg": _f(np.degrees(np.abs(params[:, 3:]).max())) if len(params) else None,
    }


def _tissue_qc(fa, md, mask, voxel_ml: float) -> dict:
    """FA and MD summaries in the mask and in its white-matter-like part (FA > WM_FA_THRESHOLD)."""
    fa_in = fa[mask & np.isfinite(fa)]
    md_in = md[mask & np.isfinite(md)]
    wm = mask & np.isfinite(fa) & (fa > WM_FA_THRESHOLD)
    return {
        "fa_mean": _f(fa_in.mean()) if fa_in.size else None,
        "fa_median": _f(np.median(fa_in)) if fa_in.size else None,
        "fa_mean_wm": _f(fa[wm].mean()) if wm.any() else None,
        "fa_p95": _f(np.percentile(fa_in, 95)) if fa_in.size else None,
        "wm_like_volume_ml": int(wm.sum()) * voxel_ml,
        "wm_fa_threshold": WM_FA_THRESHOLD,
        "md_median": _f(np.median(md_in)) if md_in.size else None,
        "md_mean_wm": _f(md[wm].mean()) if wm.any() else None,
        "n_nonfinite_in_mask": int(np.count_nonzero(mask & ~(np.isfinite(fa) & np.isfinite(md)))),
    }


def _motion_step_qc(fd_radius_mm, dropout_slices, resampled) -> dict:
    """The motion step's own QC keys: FD radius, dropout slices, resampled volumes."""
    out = {"fd_radius_mm": float(fd_radius_mm)}
    if dropout_slices is not None:
        out["n_dropout_slices"] = len(dropout_slices)
        out["dropout_volumes"] = sorted({int(v) for v, _ in dropout_slices})
    if resampled is not None:
        out["n_resampled_volumes"] = int(np.sum(np.asarray(resampled) > 0))
    return out

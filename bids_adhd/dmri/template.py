"""Standardisation for the network: FA to the MNI152 2009 template, fixed grid.

Plain functions (no Nipype); the interface in ``interfaces/`` calls them.

Spaces and conventions
----------------------
*World* coordinates are scanner/template millimetres in **RAS+** (the NIfTI
convention): +x right, +y anterior, +z superior.

The registration result ``reg["affine"]`` is a 4×4 **world-to-world** matrix
``A`` that maps a point in *template* mm to the corresponding point in
*subject* (native DWI) mm::

    x_subject = A @ x_template          (homogeneous, RAS+ mm)

This is the "pull" (resampling) direction: to fill voxel ``v`` of the template
grid, look up the subject image at ``A @ grid_affine @ v``. It is the same
direction as DIPY's ``AffineMap.affine`` (static = template, moving =
subject), as the simulator's truth pose (template mm → subject scanner mm,
``desc-pose_xfm.json``), and — after RAS→LPS conversion — as the ITK
transform that ``antsApplyTransforms -r <template> -i <dwi map>`` expects, which
is why the file is named ``_from-dwi_to-MNI152NLin2009aSym_mode-image_xfm.txt``
(the transform that moves a DWI *image* into the template, in the nipreps
sense).

Template target
---------------
``fa_target`` builds an FA-like image from nilearn's packaged MNI152 2009
(ICBM 2009a, symmetric) tissue probability maps: ``0.6·WM + 0.15·GM`` inside
nilearn's MNI152 brain mask, zero outside (typical adult FA is ≈0.4–0.7 in
white matter and ≈0.1–0.2 in cortex; the participant-level FA is zero outside
the brain mask, so the target is too). It is resampled from 1 mm with a
Gaussian pre-filter whose FWHM equals the target voxel size (anti-aliasing).
Registration fits against the target at ``TemplateConfig.registration_mm`` (2 mm
by default) on the brain's bounding box + 16 mm, whatever the output grid, so the
transform does not depend on the preset's output resolution; a preset may choose a
coarser target (``fast`` fits at 4 mm for its 6 mm grid; CPU time and similarity of
both on a demo subject: ``benchmarks/results/code_timings.md``).

Output grid
-----------
``template_grid(cfg)``: ``cfg.shape`` voxels of ``cfg.resolution_mm``, axis
aligned (RAS+, no rotation), centred on ``TEMPLATE_CENTRE_MM`` = the centre of
the bounding box of nilearn's MNI152 2009 brain mask at 1 mm,
(0, −17, 5) mm. The corner voxel is snapped to a multiple of the resolution
so that voxel centres lie on the lattice ``k·resolution`` mm (at 2 mm the grid
coincides with the 2 mm MNI152 voxels). It depends only on resolution and
shape: every subject and every preset with the same two numbers gets the same
grid. 96×112×96 at 2 mm spans 192×224×192 mm and 48×48×48 at 4 mm spans
192 mm per axis; both contain the whole brain mask (145×181×155 mm).
"""
from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import nibabel as nib

from ..config import TemplateConfig
from ..errors import DataError
from .geometry import matrix_to_euler, polar_rotation, rotation_angle_deg  # noqa: F401 (T.rotation_angle_deg)

TEMPLATE_CENTRE_MM = (0.0, -17.0, 5.0)
"""Centre of the bounding box of nilearn's MNI152 2009 brain mask (1 mm), RAS mm."""

FA_WEIGHTS = {"wm": 0.6, "gm": 0.15}
"""FA-like target = 0.6·P(WM) + 0.15·P(GM) inside the MNI brain mask."""

MI_NBINS = 32
MI_SAMPLING_PROPORTION = 0.1
"""Mutual information uses every 10th voxel of the 2 mm target (jittered regular grid, ~90k points)."""

SYN_LEVEL_ITERS = (20, 10, 5)
SYN_CC_RADIUS = 2

_RAS2LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --- grid and target ---------------------------------------------------------

def template_grid(cfg: TemplateConfig | None = None) -> tuple[tuple[int, int, int], np.ndarray]:
    """The fixed output grid ``(shape, affine)`` the network reads.

    ``affine`` maps voxel indices to RAS+ template mm. See the module docstring
    for how the centre is chosen.
    """
    cfg = cfg or TemplateConfig()
    res = float(cfg.resolution_mm)
    shape = tuple(int(s) for s in cfg.shape)
    half = (np.asarray(shape, float) - 1.0) / 2.0 * res
    origin = np.asarray(TEMPLATE_CENTRE_MM, float) - half
    origin = np.floor(origin / res + 0.5) * res       # voxel centres on the k·res lattice
    affine = np.diag([res, res, res, 1.0])
    affine[:3, 3] = origin
    return shape, affine


def _mni_maps_1mm() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(wm, gm, brain mask, affine) of the MNI152 2009a maps (:mod:`bids_adhd.dmri.mni152`)."""
    from .mni152 import maps_1mm

    mni = maps_1mm()
    return mni["wm"], mni["gm"], mni["brain"].copy(), mni["affine"]


@functools.lru_cache(maxsize=1)
def _fa_1mm() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    wm, gm, mask, affine = _mni_maps_1mm()
    fa = (FA_WEIGHTS["wm"] * wm + FA_WEIGHTS["gm"] * gm) * mask
    fa.setflags(write=False)
    mask.setflags(write=False)
    return fa, mask, affine


def resample_to_grid(data: np.ndarray, affine: np.ndarray, shape, target_affine: np.ndarray, order: int = 1,
                     prefilter_fwhm_mm=None) -> np.ndarray:
    """The one axis-aligned resampler: an image on one grid onto another (world coordinates), float32.

    ``prefilter_fwhm_mm``: None, no pre-filter; a number (or one per axis),
    a Gaussian that brings the source to that FWHM (its own voxel size
    counted in quadrature); ``"target"``, the target's voxel size, and only
    where the target is coarser than 1.01 x the source (anti-aliasing).
    Used for the template target (a fixed FWHM) and for the group level's
    inputs (``"target"``, :func:`bids_adhd.learn.data.resample_to_grid`).
    """
    from scipy import ndimage

    data = np.asarray(data, np.float32)
    src_vox = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    fwhm = prefilter_fwhm_mm
    if isinstance(fwhm, str):
        if fwhm != "target":
            raise ValueError(f"prefilter_fwhm_mm: a number, None or 'target' (got {fwhm!r})")
        dst_vox = np.sqrt((np.asarray(target_affine)[:3, :3] ** 2).sum(0))
        fwhm = dst_vox if np.any(dst_vox > src_vox * 1.01) else None
    if fwhm is not None and np.any(fwhm):
        sig = np.sqrt(np.maximum(fwhm ** 2 - src_vox ** 2, 0)) / 2.3548 / src_vox
        if np.any(sig > 0):
            data = ndimage.gaussian_filter(data, sig, mode="constant")
    vox = np.linalg.solve(affine, target_affine)     # target voxel -> source voxel
    return ndimage.affine_transform(data, vox[:3, :3], vox[:3, 3], output_shape=tuple(int(s) for s in shape),
                                    order=order, mode="constant", cval=0.0)


FOV_MARGIN_MM = 16.0
"""fa_target covers the template brain's bounding box plus this margin on every side."""


@functools.lru_cache(maxsize=1)
def brain_bbox_mm() -> tuple[np.ndarray, np.ndarray]:
    """(min, max) RAS mm of the voxel centres of nilearn's 1 mm MNI152 brain mask."""
    _, mask1, a1 = _fa_1mm()
    idx = [np.flatnonzero(mask1.any(axis=tuple(j for j in range(3) if j != i))) for i in range(3)]
    lo = np.array([i[0] for i in idx], float)
    hi = np.array([i[-1] for i in idx], float)
    lo_mm = a1[:3, :3] @ lo + a1[:3, 3]
    hi_mm = a1[:3, :3] @ hi + a1[:3, 3]
    return np.minimum(lo_mm, hi_mm), np.maximum(lo_mm, hi_mm)


@functools.lru_cache(maxsize=8)
def _mni_fov(resolution_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Grid of ``fa_target``: the MNI brain bounding box ± ``FOV_MARGIN_MM``, on the k·res lattice."""
    res = float(resolution_mm)
    bmin, bmax = brain_bbox_mm()
    lo = np.floor((bmin - FOV_MARGIN_MM) / res) * res
    hi = np.ceil((bmax + FOV_MARGIN_MM) / res) * res
    shape = tuple(int(n) for n in np.round((hi - lo) / res).astype(int) + 1)
    affine = np.diag([res, res, res, 1.0])
    affine[:3, 3] = lo
    return shape, affine


@functools.lru_cache(maxsize=8)
def _target_on(shape: tuple, affine_key: tuple) -> tuple[np.ndarray, np.ndarray]:
    affine = np.asarray(affine_key, float).reshape(4, 4)
    fa1, mask1, a1 = _fa_1mm()
    res = float(np.abs(np.linalg.det(affine[:3, :3])) ** (1 / 3))
    fwhm = res if res > 1.0 + 1e-6 else None
    fa = resample_to_grid(fa1, a1, shape, affine, order=1, prefilter_fwhm_mm=fwhm)
    mask = resample_to_grid(mask1.astype(np.float32), a1, shape, affine, order=1) >= 0.5
    fa = np.clip(fa, 0, 1).astype(np.float32)
    fa.setflags(write=False)
    mask.setflags(write=False)
    return fa, mask


def target_on_grid(shape, affine) -> tuple[np.ndarray, np.ndarray]:
    """(FA-like target, brain mask) of the template sampled on any axis-aligned grid."""
    key = tuple(float(v) for v in np.asarray(affine, float).ravel())
    fa, mask = _target_on(tuple(int(s) for s in shape), key)
    return fa.copy(), mask.copy()


def fa_target(resolution_mm: float = 2.0) -> nib.Nifti1Image:
    """FA-like template target at ``resolution_mm`` (the registration's static image).

    Field of view: the MNI152 brain mask's bounding box plus 16 mm on every
    side (89×108×94 voxels at 2 mm), voxel centres on multiples of the
    resolution. Values:
    ``0.6·P(WM) + 0.15·P(GM)`` inside the MNI152 brain mask (nilearn's packaged
    ICBM 2009a symmetric maps), Gaussian pre-filtered (FWHM = voxel size) and
    linearly resampled from 1 mm; float32, values in [0, 0.6].
    """
    shape, affine = _mni_fov(float(resolution_mm))
    fa, _ = target_on_grid(shape, affine.copy())
    img = nib.Nifti1Image(fa, affine)
    img.header.set_xyzt_units("mm")
    return img


def template_mask(shape, affine) -> np.ndarray:
    """The MNI152 brain mask (bool) on a grid, e.g. ``template_mask(*template_grid(cfg))``."""
    return target_on_grid(shape, affine)[1]


# --- registration ------------------------------------------------------------

def _seeded_mi_metric(seed: int):
    """DIPY's MI metric (``MI_NBINS`` bins, ``MI_SAMPLING_PROPORTION`` of the voxels) sampled from ``seed``."""
    from ._mi import seeded_mi_metric

    return seeded_mi_metric(seed, MI_NBINS, MI_SAMPLING_PROPORTION)


def _check_input(fa, fa_affine, mask):
    fa = np.asarray(fa, dtype=np.float64)
    if fa.ndim != 3:
        raise DataError(f"FA map must be 3D for template registration (got shape {fa.shape})")
    fa_affine = np.asarray(fa_affine, dtype=np.float64)
    if fa_affine.shape != (4, 4) or not np.all(np.isfinite(fa_affine)) \
            or abs(np.linalg.det(fa_affine[:3, :3])) < 1e-6:
        raise DataError("FA map has an invalid (singular or non-finite) affine")
    fa = np.nan_to_num(fa, nan=0.0, posinf=0.0, neginf=0.0)
    fa = np.clip(fa, 0.0, 1.0)
    if mask is not None:
        mask = np.asarray(mask) > 0
        if mask.shape != fa.shape:
            raise DataError(f"brain mask shape {mask.shape} differs from FA shape {fa.shape}")
        fa = fa * mask
    if np.count_nonzero(fa > 0) < 1000:
        raise DataError("FA map is (almost) empty; cannot register it to the template")
    return fa, fa_affine


def decompose_affine(matrix) -> dict:
    """Translation (mm), rotation (deg, x-y-z Euler of the polar factor), scales of a 4×4."""
    m = np.asarray(matrix, float)
    lin = m[:3, :3]
    rot = polar_rotation(lin)
    stretch = rot.T @ lin                # lin = rot @ stretch (polar decomposition)
    return {"translation_mm": m[:3, 3].tolist(),
            "rotation_deg": np.degrees(matrix_to_euler(rot)).tolist(),
            "rotation_angle_deg": float(rotation_angle_deg(rot)),
            "scales": np.linalg.eigvalsh((stretch + stretch.T) / 2).tolist(),
            "determinant": float(np.linalg.det(lin))}


def similarity(a, b, mask) -> float:
    """Pearson (normalised) cross-correlation of two images inside ``mask``."""
    mask = np.asarray(mask, bool)
    x = np.asarray(a, float)[mask]
    y = np.asarray(b, float)[mask]
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def _affine_registration(cfg: TemplateConfig, seed: int):
    from dipy.align.imaffine import AffineRegistration

    return AffineRegistration(metric=_seeded_mi_metric(seed),
                              level_iters=list(cfg.affine_level_iters),
                              sigmas=list(cfg.affine_sigmas),
                              factors=list(cfg.affine_factors), verbosity=0)


def _affine_stages(static, static_affine, moving, moving_affine, cfg: TemplateConfig, seed: int):
    """(template → subject world affine, per-stage parameters): centre of mass, then translation,
    rigid and affine DIPY MI registrations, each starting from the one before."""
    from dipy.align.imaffine import transform_centers_of_mass
    from dipy.align.transforms import (AffineTransform3D, RigidTransform3D,
                                       TranslationTransform3D)

    com = transform_centers_of_mass(static, static_affine, moving, moving_affine)
    params: dict[str, Any] = {"centre_of_mass": com.affine[:3, 3].tolist()}
    current = com.affine
    fopt = None
    for name, transform in (("translation", TranslationTransform3D()),
                            ("rigid", RigidTransform3D()),
                            ("affine", AffineTransform3D())):
        affreg = _affine_registration(cfg, seed)
        amap, xopt, fopt = affreg.optimize(static, moving, transform, None,
                                           static_grid2world=static_affine,
                                           moving_grid2world=moving_affine,
                                           starting_affine=current, ret_metric=True)
        current = amap.affine
        params[name] = np.asarray(xopt, float).tolist()
    affine = np.asarray(current, float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-3:
        raise DataError("registration to the template failed (degenerate transform); check the FA map")
    params["mutual_information"] = float(-fopt) if fopt is not None else None
    return affine, params


def _syn(static, static_affine, moving, moving_affine, affine, params: dict):
    """DIPY SyN (local cross-correlation) after ``affine``; records its levels in ``params``."""
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric

    sdr = SymmetricDiffeomorphicRegistration(CCMetric(3, radius=SYN_CC_RADIUS),
                                             level_iters=list(SYN_LEVEL_ITERS))
    sdr.verbosity = 0
    syn_map = sdr.optimize(static, moving, static_grid2world=static_affine,
                           moving_grid2world=moving_affine, prealign=affine)
    params["syn_level_iters"] = list(SYN_LEVEL_ITERS)
    return syn_map


def register_to_template(fa, fa_affine, mask=None, cfg: TemplateConfig | None = None,
                         seed: int = 0) -> dict[str, Any]:
    """Affine (and optionally SyN) registration of a native-space FA map to the template.

    Steps: centre-of-mass alignment → translation (3 dof) → rigid (6) → affine
    (12, absorbs head size) with DIPY's mutual information (32 bins, 10 % of the
    template voxels, seeded), multi-resolution with ``cfg.affine_level_iters``,
    ``cfg.affine_factors``, ``cfg.affine_sigmas``; then, when ``cfg.syn``, DIPY
    SyN with a local cross-correlation metric. Static image: ``fa_target(2 mm)``.

    Parameters
    ----------
    fa : (X, Y, Z) array, native-space FA (NaN → 0, clipped to [0, 1]).
    fa_affine : 4×4 voxel → RAS mm of ``fa``.
    mask : optional native brain mask; FA outside it is set to 0.
    cfg : TemplateConfig (grid, iterations, ``syn``).
    seed : seed of the MI sampling points.

    Returns
    -------
    dict with
      ``affine``: 4×4 world-to-world, template RAS mm → subject RAS mm (the pull
        direction; see the module docstring);
      ``params``: per-stage optimiser parameters plus ``decomposed`` (translation,
        rotations, scales of ``affine``) and ``mutual_information`` (final MI, nats);
      ``similarity``: Pearson correlation between the template target and the
        subject FA resampled to the output grid, inside the template brain mask;
      ``mapping``: DIPY ``AffineMap`` (domain = output grid, codomain = FA grid);
      ``syn_mapping``: DIPY ``DiffeomorphicMap`` or None;
      ``grid``: (shape, affine) of the output grid; ``time_s``.
    """
    import time

    from dipy.align.imaffine import AffineMap

    cfg = cfg or TemplateConfig()
    t0 = time.perf_counter()
    moving, moving_affine = _check_input(fa, fa_affine, mask)
    static_img = fa_target(cfg.registration_mm)
    static = np.asarray(static_img.dataobj, dtype=np.float64)
    static_affine = static_img.affine
    affine, params = _affine_stages(static, static_affine, moving, moving_affine, cfg, seed)
    syn_map = _syn(static, static_affine, moving, moving_affine, affine, params) if cfg.syn else None

    shape, grid_affine = template_grid(cfg)
    mapping = AffineMap(affine, domain_grid_shape=shape, domain_grid2world=grid_affine,
                        codomain_grid_shape=moving.shape, codomain_grid2world=moving_affine)
    params["decomposed"] = decompose_affine(affine)
    reg = {"affine": affine, "params": params, "mapping": mapping, "syn_mapping": syn_map,
           "grid": (shape, grid_affine)}
    warped, _ = to_template(moving, moving_affine, reg, cfg, order=1)
    target, tmask = target_on_grid(shape, grid_affine)
    reg["similarity"] = similarity(target, warped, tmask)
    reg["time_s"] = time.perf_counter() - t0
    return reg


def antialias(vals: np.ndarray, image_affine, out_voxel_mm: float) -> np.ndarray:
    """Gaussian pre-filter before resampling to a coarser grid: FWHM² = out² − in² per axis (the
    recipe of ``resample_to_grid`` and the template target); unchanged where the output voxel is not
    larger than the native one."""
    from scipy import ndimage

    in_vox = np.sqrt((np.asarray(image_affine, float)[:3, :3] ** 2).sum(0))
    sig = np.sqrt(np.maximum(float(out_voxel_mm) ** 2 - in_vox ** 2, 0)) / 2.3548 / in_vox
    return ndimage.gaussian_filter(vals, sig, mode="constant") if np.any(sig > 0) else vals


def to_template(image_data, image_affine, reg: dict, cfg: TemplateConfig | None = None,
                order: int = 1, anti_alias: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Resample a native-space image onto the template grid with ``reg``'s transform.

    ``order`` 1 = trilinear (FA, MD), 0 = nearest. Boolean or integer masks
    (dtype bool, or ``order=0`` with values in {0, 1}) are resampled
    trilinearly and thresholded at 0.5, which keeps their volume and avoids
    the blockiness of nearest neighbour; the result is uint8. A 4D image is
    resampled volume by volume. NaN → 0. ``anti_alias``: when the output voxel
    is larger than the native one, maps (not masks) are low-pass filtered first
    (:func:`antialias`; e.g. the ``fast`` preset's 6 mm grid from 2.5 mm data).
    Returns ``(data, grid_affine)``.
    """
    cfg = cfg or TemplateConfig()
    if order not in (0, 1):
        raise ValueError("order must be 0 (nearest) or 1 (trilinear)")
    data = np.asarray(image_data)
    image_affine = np.asarray(image_affine, float)
    shape, grid_affine = template_grid(cfg)
    is_mask = data.dtype == bool or (order == 0 and data.size > 0 and bool(np.all((data == 0) | (data == 1))))
    if data.ndim == 4:
        out = np.stack([to_template(data[..., i], image_affine, reg, cfg, order, anti_alias)[0]
                        for i in range(data.shape[3])], axis=-1)
        return out, grid_affine
    if data.ndim != 3:
        raise DataError(f"cannot resample an image of shape {data.shape} to the template")
    vals = np.nan_to_num(data.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if anti_alias and order == 1 and not is_mask:
        vals = antialias(vals, image_affine, cfg.resolution_mm)
    interp = "linear" if (order == 1 or is_mask) else "nearest"
    syn_map = reg.get("syn_mapping")
    if syn_map is not None:
        out = syn_map.transform(vals, interpolation=interp,
                                image_world2grid=np.linalg.inv(image_affine),
                                out_shape=shape, out_grid2world=grid_affine)
    else:
        from dipy.align.imaffine import AffineMap

        amap = AffineMap(np.asarray(reg["affine"], float))
        out = amap.transform(vals, interpolation=interp, image_grid2world=image_affine,
                             sampling_grid_shape=shape, sampling_grid2world=grid_affine)
    out = np.asarray(out)
    if is_mask:
        return (out >= 0.5).astype(np.uint8), grid_affine
    return out.astype(np.float32), grid_affine


# --- ITK transform files -----------------------------------------------------

def ras_to_lps(matrix) -> np.ndarray:
    """Convert a 4×4 world-to-world transform between RAS+ and LPS (its own inverse)."""
    return _RAS2LPS @ np.asarray(matrix, float) @ _RAS2LPS


lps_to_ras = ras_to_lps


def itk_affine_text(matrix) -> str:
    """A RAS world-to-world 4×4 as the text of an ITK ``AffineTransform_double_3_3`` file
    (``derivatives.write_text`` writes it; this module names and writes no files).

    ITK works in LPS physical space, so ``M_lps = F · M_ras · F`` with
    ``F = diag(-1, -1, 1, 1)`` (element (i, j) of the 3×3 part changes sign when
    exactly one of i, j is an x or y axis; the x and y translations change
    sign). The file stores the 3×3 matrix row by row, then the translation, with
    ``FixedParameters: 0 0 0`` (centre at the origin, so the translation is the
    offset). The direction is kept: ``reg["affine"]`` (template → subject)
    becomes the ITK transform mapping template LPS points to DWI LPS points,
    the one ITK/ANTs resample with when moving the DWI image into the template.
    """
    m = np.asarray(matrix, float)
    if m.shape != (4, 4) or not np.allclose(m[3], [0, 0, 0, 1]):
        raise ValueError("expected a 4×4 affine with last row 0 0 0 1")
    lps = ras_to_lps(m)
    params = list(lps[:3, :3].ravel()) + list(lps[:3, 3])
    return ("#Insight Transform File V1.0\n"
            "#Transform 0\n"
            "Transform: AffineTransform_double_3_3\n"
            f"Parameters: {' '.join(repr(float(v)) for v in params)}\n"
            "FixedParameters: 0 0 0\n")


def read_itk_affine(path: os.PathLike) -> np.ndarray:
    """Read an ITK affine text transform (any centre) back to a RAS 4×4 world-to-world matrix."""
    from pathlib import Path

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        from ..errors import MissingInputError

        raise MissingInputError(f"cannot read transform {path}: {exc.strerror}") from None
    fields: dict[str, str] = {}
    for line in lines:
        if ":" in line and not line.startswith("#"):
            key, value = line.split(":", 1)
            fields.setdefault(key.strip(), value.strip())
    kind = fields.get("Transform", "")
    if not any(kind.startswith(k) for k in ("AffineTransform_", "MatrixOffsetTransformBase_")) \
            or not kind.endswith("_3_3"):
        raise DataError(f"{path}: not a 3D ITK affine transform (Transform: {kind or 'missing'})")
    try:
        p = np.array(fields["Parameters"].split(), float)
        c = np.array(fields.get("FixedParameters", "0 0 0").split(), float)
    except (KeyError, ValueError):
        raise DataError(f"{path}: malformed ITK transform parameters") from None
    if p.size != 12 or c.size != 3:
        raise DataError(f"{path}: expected 12 parameters and 3 fixed parameters")
    lin = p[:9].reshape(3, 3)
    offset = p[9:] + c - lin @ c                  # ITK: y = A (x - c) + t + c
    lps = np.eye(4)
    lps[:3, :3] = lin
    lps[:3, 3] = offset
    return lps_to_ras(lps)

"""Template registration, the fixed output grid and ITK transform files.

What "recovers the pose" means here: the planted pose ``P`` maps template mm to
subject mm; registration returns ``A`` in the same direction. The error
transform ``E = P⁻¹·A`` should be the identity. We measure

* the rotation error: the angle of the rotation (polar factor) of ``E``;
* the mean (and max) displacement |A·x − P·x| in mm over the template
  brain-mask points x (every 50th 1 mm voxel), i.e. how far each template
  brain point lands from where it really is in the subject — the error that
  matters for the network's input.

Tolerances: rotation ≤ 1.5°, mean displacement ≤ 1.5 mm (0.6 voxel at
2.5 mm), max ≤ 3 mm. Measured on the data below: ≈ 0.02° and ≈ 0.13 mm mean.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from bids_adhd import derivatives as dv
from bids_adhd.config import TemplateConfig, load_pipeline, preset_names
from bids_adhd.dmri import template as T
from bids_adhd.errors import DataError

ROT_TOL_DEG = 1.5
MEAN_DISP_TOL_MM = 1.5
MAX_DISP_TOL_MM = 3.0
CORR_MIN = 0.9


def _pose(rot_deg, shift_mm, scale=1.0):
    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("xyz", rot_deg, degrees=True).as_matrix() * scale
    m[:3, 3] = shift_mm
    return m


def _subject(pose, seed, res=2.5, shape=(72, 88, 72), offset=(3.0, -14.0, 9.0), noise=0.02):
    """FA-like subject: 0.6·WM + 0.15·GM moved by ``pose`` and sampled on an axis-aligned 2.5 mm grid.

    The subject is deliberately not identical to the registration target: it
    is smoothed differently (σ = 0.8 mm at 1 mm, then trilinear sampling on a
    2.5 mm grid without anti-aliasing) and carries Gaussian noise (σ = 0.02)
    inside its brain mask.
    """
    fa1, mask1, a1 = T._fa_1mm()
    aff = np.diag([res, res, res, 1.0])
    aff[:3, 3] = -(np.array(shape) - 1) / 2 * res + np.asarray(offset)
    vox = np.linalg.inv(a1) @ np.linalg.inv(pose) @ aff      # subject voxel → template voxel
    smooth = ndimage.gaussian_filter(np.asarray(fa1, np.float32), 0.8)
    fa = ndimage.affine_transform(smooth, vox[:3, :3], vox[:3, 3], output_shape=shape, order=1)
    mask = ndimage.affine_transform(mask1.astype(np.float32), vox[:3, :3], vox[:3, 3],
                                    output_shape=shape, order=1) >= 0.5
    rng = np.random.default_rng(seed)
    fa = np.clip(fa + noise * rng.standard_normal(shape), 0, 1) * mask
    return fa.astype(np.float32), aff, mask


def _brain_points(step=50):
    _, mask1, a1 = T._fa_1mm()
    ijk = np.argwhere(mask1)[::step]
    return np.c_[ijk, np.ones(len(ijk))] @ a1.T


def _pose_error(found, truth):
    pts = _brain_points()
    disp = np.linalg.norm((pts @ found.T - pts @ truth.T)[:, :3], axis=1)
    err = np.linalg.inv(truth) @ found
    return T.rotation_angle_deg(err[:3, :3]), float(disp.mean()), float(disp.max())


POSES = {
    # rotations (deg) about x, y, z; shifts (mm); isotropic size
    "a": _pose((8.0, -6.0, 4.0), (6.0, -5.0, 8.0), 1.03),
    "b": _pose((-5.0, 7.0, -9.0), (-7.0, 6.0, -4.0), 0.97),
}


@pytest.fixture(scope="module")
def registered():
    out = {}
    for i, (key, pose) in enumerate(POSES.items()):
        fa, aff, mask = _subject(pose, seed=i)
        out[key] = (pose, fa, aff, mask, T.register_to_template(fa, aff, mask))
    return out


# --- registration --------------------------------------------------------------

@pytest.mark.parametrize("key", sorted(POSES))
def test_registration_recovers_planted_pose(registered, key):
    pose, _, _, _, reg = registered[key]
    rot_err, mean_disp, max_disp = _pose_error(reg["affine"], pose)
    assert rot_err <= ROT_TOL_DEG, rot_err
    assert mean_disp <= MEAN_DISP_TOL_MM, mean_disp
    assert max_disp <= MAX_DISP_TOL_MM, max_disp
    scales = reg["params"]["decomposed"]["scales"]
    true_scale = np.cbrt(np.linalg.det(pose[:3, :3]))
    assert np.allclose(scales, true_scale, atol=0.02), (scales, true_scale)
    assert reg["similarity"] > 0.95
    assert reg["params"]["mutual_information"] > 0
    json.dumps(reg["params"])                       # sidecar-ready


def test_template_space_fa_of_two_poses_agree(registered):
    cfg = TemplateConfig()
    shape, grid = T.template_grid(cfg)
    maps = []
    for key in sorted(POSES):
        _, fa, aff, mask, reg = registered[key]
        data, out_aff = T.to_template(fa, aff, reg, cfg)
        assert data.shape == shape and data.dtype == np.float32
        np.testing.assert_array_equal(out_aff, grid)
        maps.append(data)
    tmask = T.template_mask(shape, grid)
    r = T.similarity(maps[0], maps[1], tmask)
    assert r >= CORR_MIN, r
    # and each agrees with the target it was registered to
    target, _ = T.target_on_grid(shape, grid)
    for m in maps:
        assert T.similarity(target, m, tmask) >= CORR_MIN


def test_masks_resample_as_masks(registered):
    _, _, aff, mask, reg = registered["a"]
    cfg = TemplateConfig()
    out, _ = T.to_template(mask, aff, reg, cfg)          # bool → linear + threshold
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}
    # the volume is kept (within 3 %): det(A) maps template volume to subject volume
    vol_native = mask.sum() * 2.5 ** 3
    vol_template = out.sum() * cfg.resolution_mm ** 3 * abs(np.linalg.det(reg["affine"][:3, :3]))
    assert abs(vol_template / vol_native - 1) < 0.03
    # overlaps the template brain mask well (Dice)
    tmask = T.template_mask(*T.template_grid(cfg))
    dice = 2 * np.sum(out.astype(bool) & tmask) / (out.sum() + tmask.sum())
    assert dice > 0.95, dice
    near, _ = T.to_template(mask.astype(np.float32), aff, reg, cfg, order=0)
    assert near.dtype == np.uint8


def test_same_seed_same_result():
    cfg = TemplateConfig(registration_mm=4.0, affine_level_iters=(30, 10), affine_factors=(2, 1), affine_sigmas=(1.0, 0.0))
    fa, aff, mask = _subject(POSES["a"], seed=5)
    r1 = T.register_to_template(fa, aff, mask, cfg=cfg, seed=7)
    r2 = T.register_to_template(fa, aff, mask, cfg=cfg, seed=7)
    np.testing.assert_array_equal(r1["affine"], r2["affine"])


def test_syn_smoke(monkeypatch):
    monkeypatch.setattr(T, "SYN_LEVEL_ITERS", (10, 5))
    cfg = TemplateConfig(syn=True, registration_mm=4.0, affine_level_iters=(100, 20), affine_factors=(2, 1),
                         affine_sigmas=(1.0, 0.0), resolution_mm=4.0, shape=(48, 48, 48))
    fa, aff, mask = _subject(POSES["b"], seed=3)
    reg = T.register_to_template(fa, aff, mask, cfg=cfg)
    assert reg["syn_mapping"] is not None
    out, grid = T.to_template(fa, aff, reg, cfg)
    assert out.shape == (48, 48, 48)
    assert reg["similarity"] > 0.9
    # the warp refines the affine: the template-space FA matches the target at least as well
    affine_only = dict(reg, syn_mapping=None)
    target, tmask = T.target_on_grid(*T.template_grid(cfg))
    assert T.similarity(target, out, tmask) >= T.similarity(
        target, T.to_template(fa, aff, affine_only, cfg)[0], tmask) - 0.005


def test_bad_input_is_a_data_error():
    with pytest.raises(DataError):
        T.register_to_template(np.zeros((20, 20, 20)), np.eye(4))
    with pytest.raises(DataError):
        T.register_to_template(np.ones((20, 20)), np.eye(4))
    with pytest.raises(DataError):
        T.register_to_template(np.ones((20, 20, 20)), np.zeros((4, 4)))


# --- simulator truth -------------------------------------------------------------

def test_recovers_simulator_pose(tiny_bids):
    """The simulator's truth pose (TemplateToScanner: template mm → scanner mm, our direction).

    Uses the session's shared ``tiny_bids`` dataset (``simulate_dataset``, 2 subjects,
    demo size) and registers the truth FA of the subject with the larger head
    rotation only (each registration costs ~6 s of CPU); poses ≥ 5° were checked
    by hand on another simulated dataset, with truth and DTI-fitted FA.
    """
    import nibabel as nib

    truth = tiny_bids / "derivatives" / "truth"
    poses = {p.name.split("_")[0]: json.loads(p.read_text()) for p in truth.glob("sub-*/dwi/*_desc-pose_xfm.json")}
    assert len(poses) == 2
    # the subject with the larger head rotation
    sub = max(poses, key=lambda k: np.abs(poses[k]["RotationDegrees"]).sum())
    pose_json = poses[sub]
    pose = np.array(pose_json["TemplateToScanner"])
    assert np.abs(pose_json["RotationDegrees"]).sum() > 3 or np.abs(pose_json["TranslationMm"]).max() > 3
    d = truth / sub / "dwi"
    fa_img = nib.load(d / f"{sub}_model-tensor_param-fa_dwimap.nii.gz")
    mask = np.asarray(nib.load(d / f"{sub}_desc-brain_mask.nii.gz").dataobj) > 0
    reg = T.register_to_template(np.asarray(fa_img.dataobj), fa_img.affine, mask)
    rot_err, mean_disp, max_disp = _pose_error(reg["affine"], pose)
    assert rot_err <= ROT_TOL_DEG and mean_disp <= MEAN_DISP_TOL_MM and max_disp <= MAX_DISP_TOL_MM, \
        (rot_err, mean_disp, max_disp)
    assert reg["similarity"] >= CORR_MIN


# --- the grid ------------------------------------------------------------------------

_BBOX = None


def _brain_bbox():
    """Min and max voxel-centre coordinates (RAS mm) of the 1 mm template brain mask."""
    global _BBOX
    if _BBOX is None:
        pts = _brain_points(step=1)[:, :3]
        _BBOX = (pts.min(0), pts.max(0))
    return _BBOX


def _covers(cfg):
    """Every brain voxel centre falls inside a grid voxel (the grid is axis aligned: the bbox suffices)."""
    shape, grid = T.template_grid(cfg)
    lo_mm, hi_mm = _brain_bbox()
    lo = (lo_mm - grid[:3, 3]) / np.diag(grid)[:3]
    hi = (hi_mm - grid[:3, 3]) / np.diag(grid)[:3]
    return bool(np.all(lo >= -0.5) and np.all(hi <= np.array(shape) - 0.5)), lo, hi


@pytest.mark.parametrize("res,shape", [(2.0, (96, 112, 96)), (2.0, (96, 96, 96)),
                                       (4.0, (48, 48, 48)), (6.0, (32, 32, 32))])
def test_grid_covers_template_brain(res, shape):
    cfg = TemplateConfig(resolution_mm=res, shape=shape)
    grid_shape, grid = T.template_grid(cfg)
    assert grid_shape == shape and all(s % 16 == 0 for s in grid_shape)
    np.testing.assert_array_equal(grid[:3, :3], np.diag([res] * 3))
    assert np.allclose(grid[:3, 3] / res, np.round(grid[:3, 3] / res))     # on the k·res lattice
    ok, lo, hi = _covers(cfg)
    assert ok, (lo, hi, shape)
    centre = grid[:3, :3] @ ((np.array(shape) - 1) / 2) + grid[:3, 3]
    assert np.all(np.abs(centre - T.TEMPLATE_CENTRE_MM) <= res / 2 + 1e-9)


def test_centre_is_brain_bbox_centre():
    lo, hi = _brain_bbox()
    centre = (lo + hi) / 2
    assert np.allclose(centre, T.TEMPLATE_CENTRE_MM, atol=1.0)


def test_grid_same_for_every_preset():
    for name in preset_names():
        cfg = load_pipeline(name).template
        shape, grid = T.template_grid(cfg)
        ref_shape, ref = T.template_grid(TemplateConfig(resolution_mm=cfg.resolution_mm, shape=cfg.shape))
        assert shape == ref_shape
        np.testing.assert_array_equal(grid, ref)
        assert _covers(cfg)[0], name


def test_fa_target():
    img = T.fa_target(2.0)
    data = np.asarray(img.dataobj)
    assert img.shape == (89, 108, 94) and data.dtype == np.float32
    assert 0 <= data.min() and data.max() <= 0.6 + 1e-6
    np.testing.assert_array_equal(np.diag(img.affine)[:3], [2, 2, 2])
    # white matter is brighter than grey: the centre of the corpus callosum (0, 0, 20 mm) vs cortex
    ijk = np.round(np.linalg.solve(img.affine, [0, 10, 20, 1])[:3]).astype(int)
    assert data[tuple(ijk)] > 0.4


# --- ITK files ---------------------------------------------------------------------

def test_itk_round_trip_and_lps_by_hand(tmp_path):
    ras = np.array([[1.0, 2.0, 3.0, 10.0],
                    [4.0, 5.0, 6.0, 20.0],
                    [7.0, 8.0, 10.0, 30.0],
                    [0.0, 0.0, 0.0, 1.0]])
    # by hand: LPS = F·RAS·F with F = diag(-1, -1, 1): entry (i, j) flips sign when exactly one of
    # i, j is x or y (i.e. the (x|y, z) and (z, x|y) entries); translations x, y flip.
    lps_by_hand = [1, 2, -3, 4, 5, -6, -7, -8, 10, -10, -20, 30]
    path = tmp_path / "sub-01_from-dwi_to-MNI152NLin2009aSym_mode-image_xfm.txt"
    dv.write_text(path, T.itk_affine_text(ras))
    lines = path.read_text().splitlines()
    assert lines[0] == "#Insight Transform File V1.0"
    assert lines[2] == "Transform: AffineTransform_double_3_3"
    params = [float(v) for v in lines[3].split(":")[1].split()]
    assert params == lps_by_hand
    assert lines[4].split(":")[1].split() == ["0", "0", "0"]
    np.testing.assert_array_equal(T.read_itk_affine(path), ras)

    # a point: RAS (1, 2, 3) → RAS A·p; in LPS the same physical point is (-1, -2, 3)
    p_ras = np.array([1.0, 2.0, 3.0, 1.0])
    lps = np.eye(4)
    lps[:3, :3] = np.reshape(params[:9], (3, 3))
    lps[:3, 3] = params[9:]
    q_lps = lps @ (p_ras * [-1, -1, 1, 1])
    np.testing.assert_allclose(q_lps * [-1, -1, 1, 1], ras @ p_ras)

    # a real registration matrix survives exactly (repr of doubles)
    m = _pose((8.0, -6.0, 4.0), (6.123456789, -5.5, 8.25), 1.0312345)
    dv.write_text(path, T.itk_affine_text(m))
    np.testing.assert_array_equal(T.read_itk_affine(path), m)


def test_read_itk_with_centre(tmp_path):
    # ITK: y = M (x - c) + t + c. A pure rotation about c keeps c fixed.
    rot = Rotation.from_euler("z", 30, degrees=True).as_matrix()
    c = np.array([10.0, -20.0, 5.0])                   # LPS
    text = ("#Insight Transform File V1.0\n#Transform 0\nTransform: MatrixOffsetTransformBase_double_3_3\n"
            f"Parameters: {' '.join(map(str, rot.ravel()))} 0 0 0\n"
            f"FixedParameters: {' '.join(map(str, c))}\n")
    path = tmp_path / "x.txt"
    path.write_text(text)
    ras = T.read_itk_affine(path)
    c_ras = np.r_[c * [-1, -1, 1], 1.0]
    np.testing.assert_allclose(ras @ c_ras, c_ras, atol=1e-9)
    path.write_text("#Insight Transform File V1.0\nTransform: BSplineTransform_double_3_3\n")
    with pytest.raises(DataError):
        T.read_itk_affine(path)


def test_to_template_anti_aliases_coarser_grids():
    """Native 2 mm noise onto the 6 mm grid: point sampling keeps the full variance (aliasing),
    the anti-aliased output is the Gaussian-prefiltered image sampled (FWHM² = 6² − 2²); onto a grid
    no coarser than the data nothing changes."""
    from scipy.ndimage import gaussian_filter

    from bids_adhd.config import TemplateConfig
    from bids_adhd.dmri.template import template_grid, to_template

    cfg = TemplateConfig(resolution_mm=6.0, shape=(32, 32, 32))
    _, grid = template_grid(cfg)
    rng = np.random.default_rng(0)
    native = rng.normal(size=(100, 100, 100)).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = grid[:3, 3] - 2.0                      # covers the template grid
    reg = {"affine": np.eye(4)}
    plain, _ = to_template(native, aff, reg, cfg, anti_alias=False)
    smooth, _ = to_template(native, aff, reg, cfg)
    sig = np.sqrt(6.0 ** 2 - 2.0 ** 2) / 2.3548 / 2.0
    ref, _ = to_template(gaussian_filter(native.astype(np.float64), sig, mode="constant"), aff, reg, cfg,
                         anti_alias=False)
    inner = (slice(4, -4),) * 3
    assert np.allclose(smooth[inner], ref[inner], atol=1e-5)
    assert smooth[inner].std() < 0.3 * plain[inner].std()
    fine = TemplateConfig(resolution_mm=2.0)
    a, _ = to_template(native[:50, :50, :50], aff, reg, fine)
    b, _ = to_template(native[:50, :50, :50], aff, reg, fine, anti_alias=False)
    assert np.array_equal(a, b)


def test_mni152_loader_gives_nilearns_maps():
    """The one MNI152 reader (no nilearn import) gives nilearn's loaders' arrays bit for bit."""
    import warnings

    from nilearn import datasets

    from bids_adhd.dmri import mni152
    maps = mni152.maps_1mm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, fn in (("t1", datasets.load_mni152_template), ("gm", datasets.load_mni152_gm_template),
                        ("wm", datasets.load_mni152_wm_template)):
            img = fn(resolution=1)
            assert maps[key].dtype == np.float32
            assert np.array_equal(maps[key], np.asarray(img.get_fdata(), np.float32))
            assert np.array_equal(maps["affine"], img.affine)
            assert np.array_equal(mni152.image(key).get_fdata(), img.get_fdata())
        brain = datasets.load_mni152_brain_mask(resolution=1)
        assert np.array_equal(maps["brain"], np.asarray(brain.get_fdata()) > 0.5)
        for thr in (0.2, 0.5):
            ref = np.asarray(datasets.load_mni152_wm_mask(threshold=thr).get_fdata())
            assert np.array_equal(mni152.wm_mask(thr), ref) and 0 < ref.mean() < 1
    assert not maps["wm"].flags.writeable and mni152.raw_1mm()["wm"].dtype == np.uint8


def test_one_resampler_for_fixed_and_target_prefilter():
    """resample_to_grid: 'target' pre-filters only to a coarser grid, a fixed FWHM always; a 1 mm box
    of ones stays 1 in its interior."""
    src = np.diag([1.0, 1.0, 1.0, 1.0])
    src[:3, 3] = -20
    x = np.zeros((41, 41, 41), np.float32)
    x[10:31, 10:31, 10:31] = 1
    fine = T.resample_to_grid(x, src, (41, 41, 41), src, prefilter_fwhm_mm="target")
    assert np.array_equal(fine, x)                             # same grid, no pre-filter: unchanged
    coarse = np.diag([3.0, 3.0, 3.0, 1.0])
    coarse[:3, 3] = -18
    a = T.resample_to_grid(x, src, (13, 13, 13), coarse, prefilter_fwhm_mm="target")
    b = T.resample_to_grid(x, src, (13, 13, 13), coarse, prefilter_fwhm_mm=3.0)
    c = T.resample_to_grid(x, src, (13, 13, 13), coarse)
    assert np.array_equal(a, b) and a.dtype == np.float32
    assert not np.array_equal(a, c) and c[6, 6, 6] == 1 and 0.99 < a[6, 6, 6] <= 1.0
    with pytest.raises(ValueError):
        T.resample_to_grid(x, src, (13, 13, 13), coarse, prefilter_fwhm_mm="auto")

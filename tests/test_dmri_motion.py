"""Motion correction (bids_adhd.dmri.motion): planted rigid motion is recovered,
b-vectors are rotated in the right frame and direction, FD follows Power 2012.

Tolerances (per axis): b0 volumes, planted motion (3 deg + 2.3 mm) and
unmoved, within 0.3 deg / 0.3 mm. Diffusion-weighted volumes (planted 2.5 deg
+ 1.8 mm, and unmoved) within 1.5 deg / 0.5 mm: their contrast differs from
the b0 reference's, and DIPY's mutual-information optimum is ~1 deg off on
this phantom (b0 volumes: ~0.03 deg). Rotated b-vectors within 1.5 deg of
the truth, and the planted volume's vector ends up closer to the truth than
the input by at least 1 deg (a wrong rotation direction or frame would double
the error instead).
"""
from __future__ import annotations

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import affine_transform, gaussian_filter

from bids_adhd.dmri.motion import (_frames, correct_motion, euler_to_matrix, framewise_displacement,
                                   matrix_to_euler, rigid_params, rotate_bvecs)

SHAPE = (36, 36, 24)
# LAS, 2 mm, origin far from the head: rotations about the scanner origin would
# couple badly with translations (the code registers in a centred frame)
AFFINE = np.array([[-2.0, 0, 0, 60.0], [0, 2.0, 0, -20.0], [0, 0, 2.0, 35.0], [0, 0, 0, 1]])


def centre_world():
    return AFFINE[:3, :3] @ ((np.array(SHAPE) - 1) / 2) + AFFINE[:3, 3]


def motion(rot_deg, trans):
    """Reference→volume world transform: rotation about the image centre, then translation."""
    R = euler_to_matrix(*np.radians(rot_deg))
    c = centre_world()
    A = np.eye(4)
    A[:3, :3] = R
    A[:3, 3] = c + np.asarray(trans, float) - R @ c
    return A


def phantom_series(moves, seed=0):
    """b0, b0, DW, DW, DW of a textured head with a tensor field (world frame).

    A moved volume is simulated physically: the head moves by A = [R, t]; the
    gradient (fixed in the scanner) is R^T g in the head frame; the image is
    the reference-frame image with that gradient, resampled at A^-1 y.
    """
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).astype(float)
    c = (np.array(SHAPE) - 1) / 2
    rho = np.sqrt((((g - c) / [14, 15, 9]) ** 2).sum(-1))
    tex = gaussian_filter(rng.normal(size=SHAPE), 1.5)
    tex /= tex.std()
    blobs = gaussian_filter(rng.normal(size=SHAPE), 2.0)
    csf = (blobs > np.quantile(blobs[rho < 0.8], 0.85)) & (rho < 0.8)    # CSF: bright b0, dark DW
    s0 = gaussian_filter(np.where(rho < 1, 1000 * (1 + 0.15 * tex), 0.0) + np.where(csf, 700.0, 0.0), 0.7)
    e1 = np.stack([gaussian_filter(rng.normal(size=SHAPE), 3.0) for _ in range(3)], -1)   # smooth fibre field
    e1 /= np.linalg.norm(e1, axis=-1, keepdims=True)
    Dt = 0.9e-3 * e1[..., :, None] * e1[..., None, :] + 0.5e-3 * np.eye(3)   # FA ~0.45
    Dt[csf] = 3.0e-3 * np.eye(3)
    dirs = np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0], [0.6, 0.8, 0], [0, 0.6, 0.8]], float)
    bvals = np.array([0, 0, 1000, 1000, 1000.0])
    D, F = _frames(AFFINE)
    bvecs_fsl = (F @ D.T @ dirs.T).T                                # world -> BIDS/FSL frame
    vols = []
    for i, (gw, b) in enumerate(zip(dirs, bvals)):
        A = moves.get(i, np.eye(4))
        geff = A[:3, :3].T @ gw                                     # gradient seen by the moved head
        img = s0 * np.exp(-b * np.einsum("i,...ij,j->...", geff, Dt, geff))
        if i in moves:
            M = np.linalg.inv(AFFINE) @ np.linalg.inv(A) @ AFFINE
            img = affine_transform(img, M[:3, :3], M[:3, 3], order=3)
        vols.append(np.abs(img + rng.normal(scale=8.0, size=SHAPE)))
    return np.stack(vols, -1).astype(np.float32), bvals, bvecs_fsl, dirs


@pytest.fixture(scope="module")
def corrected():
    moves = {1: motion((0, 0, 3.0), (2.0, -1.0, 0.5)), 3: motion((2.0, -1.5, 0), (0.0, 1.5, -1.0))}
    data, bvals, bvecs, dirs = phantom_series(moves)
    res = correct_motion(data, AFFINE, bvals, bvecs, nprocs=2)
    return moves, data, bvals, bvecs, dirs, res


def angle_deg(u, v):
    u, v = np.asarray(u, float), np.asarray(v, float)
    return np.degrees(np.arccos(np.clip(abs(u @ v) / np.linalg.norm(u) / np.linalg.norm(v), -1, 1)))


def test_planted_motion_recovered(corrected):
    moves, data, _, _, _, res = corrected
    truth = rigid_params(np.stack([moves.get(i, np.eye(4)) for i in range(data.shape[3])]), SHAPE, AFFINE)
    assert np.allclose(truth[1], [2, -1, 0.5, 0, 0, np.radians(3)], atol=1e-9)   # params definition
    err = res["params"] - truth
    b0 = [0, 1]
    assert np.abs(err[b0, :3]).max() < 0.3, err
    assert np.degrees(np.abs(err[b0, 3:])).max() < 0.3, err
    assert np.abs(err[:, :3]).max() < 0.5, err
    assert np.degrees(np.abs(err[:, 3:])).max() < 1.5, err
    assert res["affines"].shape == (5, 4, 4) and res["params"].shape == (5, 6)
    assert res["data"].shape == data.shape and res["data"].dtype == np.float32
    # the resampled moved b0 now matches the reference b0 much better than before
    ref = data[..., 0]
    assert np.abs(res["data"][..., 1] - ref).mean() < 0.5 * np.abs(data[..., 1] - ref).mean()
    fd = framewise_displacement(res["params"])
    assert np.array_equal(res["fd"], fd) and fd[0] == 0 and fd[1] > 2.0


def test_bvecs_rotated_by_the_head_rotation(corrected):
    moves, data, bvals, bvecs, dirs, res = corrected
    D, F = _frames(AFFINE)
    for i in range(data.shape[3]):
        out = res["bvecs"][i]
        if bvals[i] == 0:
            assert np.array_equal(out, np.zeros(3))
            continue
        R = moves.get(i, np.eye(4))[:3, :3]
        expected_world = R.T @ dirs[i]                   # the gradient seen by the head
        assert angle_deg(D @ F @ out, expected_world) < 1.5, i
        assert abs(np.linalg.norm(out) - 1) < 1e-9
    # the planted rotation (2.5 deg) moved the vector towards the truth
    truth3 = F @ D.T @ moves[3][:3, :3].T @ dirs[3]
    assert angle_deg(bvecs[3], truth3) > 2.0
    assert angle_deg(res["bvecs"][3], truth3) < angle_deg(bvecs[3], truth3) - 1.0
    # with the true affine, rotate_bvecs gives exactly R^T in world space
    exact = rotate_bvecs(bvecs[3:4], moves[3][None], AFFINE)[0]
    assert angle_deg(exact, truth3) < 1e-6


@pytest.mark.parametrize("transform", ["rigid", "rigid+affine"])
def test_rigid_and_two_stage_serial(corrected, transform):
    moves, data, bvals, bvecs, _, res = corrected
    sub = data[..., :3]
    r1 = correct_motion(sub, AFFINE, bvals[:3], bvecs[:3], transform=transform, nprocs=1, box_margin=None)
    truth = rigid_params(np.stack([moves.get(i, np.eye(4)) for i in range(3)]), SHAPE, AFFINE)
    err = r1["params"] - truth
    assert np.abs(err[:2, :3]).max() < 0.3 and np.degrees(np.abs(err[:2, 3:])).max() < 0.3, err
    assert np.abs(err[2, :3]).max() < 0.5 and np.degrees(np.abs(err[2, 3:])).max() < 1.5, err
    # the motion affines (rigid stage) are rotations; with "rigid" they are also the resampling affines
    for A in r1["motion_affines"]:
        assert np.allclose(A[:3, :3] @ A[:3, :3].T, np.eye(3), atol=1e-6)
    assert np.array_equal(r1["motion_affines"], r1["affines"]) == (transform == "rigid")


def test_framewise_displacement_power():
    p = np.array([[0, 0, 0, 0, 0, 0], [1, -1, 0.5, 0.01, 0, -0.02], [1, -1, 0.5, 0.01, 0, 0.02]])
    fd = framewise_displacement(p, radius=50)
    assert fd[0] == 0
    assert np.isclose(fd[1], 2.5 + 50 * 0.03)
    assert np.isclose(fd[2], 50 * 0.04)
    assert np.array_equal(framewise_displacement(np.zeros((1, 6))), [0.0])


def test_euler_roundtrip_and_order():
    rng = np.random.default_rng(0)
    for _ in range(20):
        ang = rng.uniform(-0.5, 0.5, 3)
        assert np.allclose(matrix_to_euler(euler_to_matrix(*ang)), ang)
    # Rz Ry Rx: x rotation acts first
    Rx, Rz = euler_to_matrix(0.3, 0, 0), euler_to_matrix(0, 0, 0.4)
    assert np.allclose(euler_to_matrix(0.3, 0, 0.4), Rz @ Rx)


@pytest.mark.skipif(shutil.which("mrinfo") is None, reason="MRtrix3 mrinfo not installed")
def test_fsl_bvec_frame_matches_mrtrix(tmp_path):
    """Our FSL -> world conversion (g_world = D F g) is MRtrix3's, for oblique
    images of both handedness; then rotate_bvecs rotates by R^T in world space."""
    rng = np.random.default_rng(1)
    bvecs = rng.normal(size=(4, 3))
    bvecs /= np.linalg.norm(bvecs, axis=1, keepdims=True)
    bvals = np.full(4, 1000.0)
    for sign in (1.0, -1.0):
        Rd = euler_to_matrix(0.2, -0.1, 0.3)
        aff = np.eye(4)
        aff[:3, :3] = Rd @ np.diag([sign * 2.0, 2.0, 2.5])
        aff[:3, 3] = [10, -20, 5]
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 4), np.float32), aff), str(tmp_path / "d.nii"))
        np.savetxt(tmp_path / "d.bvec", bvecs.T, fmt="%.8f")
        np.savetxt(tmp_path / "d.bval", bvals[None], fmt="%g")
        out = subprocess.run(["mrinfo", str(tmp_path / "d.nii"), "-fslgrad", str(tmp_path / "d.bvec"),
                              str(tmp_path / "d.bval"), "-dwgrad", "-quiet"],
                             capture_output=True, text=True, check=True).stdout
        mr = np.array([[float(v) for v in line.split()] for line in out.strip().splitlines()])[:, :3]
        D, F = _frames(aff)
        ours = (D @ F @ bvecs.T).T
        assert np.allclose(ours, mr, atol=1e-5), (sign, ours, mr)
        A = np.eye(4)
        A[:3, :3] = euler_to_matrix(0.05, -0.02, 0.04) * 1.01     # small scaling is removed
        rot = rotate_bvecs(bvecs, np.repeat(A[None], 4, 0), aff)
        R = euler_to_matrix(0.05, -0.02, 0.04)
        assert np.allclose((D @ F @ rot.T).T, (R.T @ ours.T).T, atol=1e-9)


def test_sparse_sampling_is_reproducible_across_processes():
    """DIPY jitters the sparse metric's sample points with NumPy's global generator; the
    fixed seed per registration makes the result independent of how many worker processes
    share the volumes (and of a re-run). The padded grid (77k voxels) is above MIN_SAMPLES,
    so the metric really is sparse here."""
    moves = {2: motion((0, 0, 2.0), (1.0, 0.0, 0.0))}
    data, bvals, bvecs, _ = phantom_series(moves)
    data = np.pad(data[..., :3], ((6, 6), (6, 6), (4, 4), (0, 0)))
    assert np.prod(data.shape[:3]) * 0.3 < 40_000 < np.prod(data.shape[:3])
    runs = [correct_motion(data, AFFINE, bvals[:3], bvecs[:3], nprocs=n, sampling=0.3, box_margin=None,
                           level_iters=(20, 5)) for n in (1, 2)]
    assert np.array_equal(runs[0]["affines"], runs[1]["affines"])
    assert np.array_equal(runs[0]["data"], runs[1]["data"])
    dense = correct_motion(data, AFFINE, bvals[:3], bvecs[:3], nprocs=2, sampling=None, box_margin=None,
                           level_iters=(20, 5))
    assert not np.array_equal(dense["affines"], runs[0]["affines"])     # the option took effect
    # min_samples raises the share: a floor above the grid's size makes the metric dense again,
    # a low floor leaves 0.3 in force (an explicit 40,000 is the default)
    floored = correct_motion(data, AFFINE, bvals[:3], bvecs[:3], nprocs=2, sampling=0.3, box_margin=None,
                             level_iters=(20, 5), min_samples=10 ** 9)
    assert np.array_equal(floored["affines"], dense["affines"])
    low = correct_motion(data, AFFINE, bvals[:3], bvecs[:3], nprocs=2, sampling=0.3, box_margin=None,
                         level_iters=(20, 5), min_samples=1000)
    assert not np.array_equal(low["affines"], runs[0]["affines"])       # 0.3 instead of 40k/77k

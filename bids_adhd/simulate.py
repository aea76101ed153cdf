"""Synthetic BIDS diffusion dataset with a planted ADHD effect and exact ground truth.

``simulate_dataset(out_dir, ...)`` writes a valid BIDS dataset (DWI + T1w per
subject/session, ``participants.tsv`` with a balanced ADHD/TD diagnosis) and,
under ``derivatives/truth/``, the exact ground truth: FA/MD/AD/RD maps, tissue
and brain masks, the effect region, the head pose and the per-volume motion.
``bids_adhd simulate OUT_DIR ...`` is the command-line front end
(``add_cli_arguments`` / ``run_cli``). See ``docs/simulation.md``.

The phantom in brief
--------------------
* Anatomy: nilearn's packaged MNI152 2009a (symmetric) GM and WM probability
  maps and whole-brain mask (T1 template > 0.2); CSF = mask - GM - WM, clipped
  at 0. The maps are smoothed once with a Gaussian whose FWHM equals the DWI
  voxel size (partial-volume model) and then sampled with trilinear
  interpolation at the template point of every scanner-space voxel centre.
* One diffusion tensor per voxel: the tissue-weighted mix of three
  cylindrically symmetric tissue tensors that share the principal direction
  ``e`` of a smooth analytic fibre field (so the mix is cylindrically symmetric
  too). Subject variation and the ADHD effect are then applied to the
  voxel's (FA, MD) and converted back to eigenvalues in closed form:
  ``k = FA / sqrt(3 - 2 FA^2)``, ``AD = MD (1 + 2k)``, ``RD = MD (1 - k)``.
  The truth maps are therefore the exact FA/MD/AD/RD of the simulated tensor.
* Signal ``S = S0 exp(-b g_head^T D g_head)``, ``g_head = R^T g_scanner`` where
  ``R`` is the head rotation at that volume (pose x motion); Rician noise with
  ``sigma = S0_WM / snr``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from . import derivatives as _d
from .dmri import mni152
from .dmri.geometry import euler_to_matrix
from .entities import TEMPLATE_SPACE
from .errors import OutputError, UsageError
from .settings import SIMULATOR_PROFILES, SimulateSettings

LOG = logging.getLogger("bids_adhd.simulate")

# --- fixed physical / anatomical parameters ----------------------------------

#: Tissue tensors. WM FA rises with the voxel's WM fraction w: FA = 0.45 + 0.25 w.
WM_FA_BASE, WM_FA_SLOPE, WM_MD = 0.45, 0.25, 0.70e-3
GM_FA, GM_MD = 0.15, 0.80e-3
CSF_MD = 3.0e-3
#: b0 signal of pure tissue (arbitrary units; CSF brighter, as at TE ~ 90 ms).
S0_WM, S0_GM, S0_CSF = 1000.0, 1150.0, 2200.0

#: Subject variation.
POSE_MAX_ROT_DEG = 10.0      # uniform in [-10, 10] deg about each scanner axis
POSE_MAX_SHIFT_MM = 8.0      # uniform in [-8, 8] mm along each axis
SIZE_SCALE_MAX = 0.04        # isotropic head size: uniform in [0.96, 1.04]
GLOBAL_JITTER_SD = 0.02      # FA and MD global scales ~ N(1, 0.02), clipped to +-0.05
FA_FIELD_SD = 0.03           # smooth multiplicative FA field, SD ~3 %, clipped to +-10 %
FA_FIELD_WAVES = 4
FA_FIELD_WAVELENGTH_MM = (80.0, 160.0)

#: Per-volume motion (never the first volume, the reference b0).
MOTION_VOLUMES = (3, 4)      # how many volumes move per run (inclusive range)
MOTION_MAX_ROT_DEG = 1.5
MOTION_MAX_SHIFT_MM = 1.5

#: Eddy-current distortion of every DW volume: a displacement along the phase-encoding
#: axis (j) that is a linear function of position (scale along j, shears along i and k)
#: plus a shift, each term proportional to one scanner-frame gradient component and to
#: b / 1000 (Jezzard et al. 1998; FSL eddy's linear model). Per-subject coefficients,
#: uniform in these ranges (magnitudes: up to ~0.7 mm at 60 mm from the centre at b=1000).
EDDY_COEFF_RANGE = (0.004, 0.012)     # |scale/shear| per unit gradient component at b = 1000
EDDY_SHIFT_MM_MAX = 0.8               # |shift| (mm) per unit gradient component at b = 1000
EDDY_PE_AXIS = 1                      # "j-" (PhaseEncodingDirection written to the sidecar)
#: Slice dropouts (signal loss in one slice of a DW volume, e.g. bulk motion during the
#: diffusion encoding): how many per run (inclusive range), the remaining signal fraction.
DROPOUTS_PER_RUN = (2, 4)
DROPOUT_SIGNAL = (0.05, 0.5)
DROPOUT_SLICE_AXIS = 2                # "k" (SliceEncodingDirection)

#: The named effect region: an MNI box intersected with WM probability > 0.5.
EFFECT_REGION = "frontal-callosal"
EFFECT_BOX_MM = {"x": (-30.0, 30.0), "y": (-10.0, 45.0), "z": (0.0, 35.0)}
EFFECT_WM_THRESHOLD = 0.5

#: Head-frame centre of the field of view: centre of the MNI brain mask's bounding box.
BRAIN_CENTRE_MNI = (0.0, -17.0, 5.0)

DIAGNOSES = ("ADHD", "TD")
SITES = ("SiteA", "SiteB")


@dataclass(frozen=True)
class Protocol:
    """Acquisition geometry and b-table of one ``size``."""

    name: str
    voxel_mm: float
    shape: tuple
    shells: tuple                 # (b-value, directions) per shell
    n_b0: int
    echo_time: float
    repetition_time: float
    total_readout_time: float
    t1_voxel_mm: float = 2.0
    t1_shape: tuple = (80, 100, 84)


SIZES = {
    "demo": Protocol("demo", 2.5, (64, 76, 64), ((1000, 30),), 3,
                     echo_time=0.089, repetition_time=3.2, total_readout_time=0.05),
    # HBN-like (CBIC): 1.8 mm, two shells of 64 directions, b0s interleaved.
    "hbn": Protocol("hbn", 1.8, (128, 128, 84), ((1000, 64), (2000, 64)), 5,
                    echo_time=0.1002, repetition_time=3.32, total_readout_time=0.0513),
}

# The simulator's random streams: np.random.default_rng([seed, STREAM, ...]).
_PARTICIPANTS, _ANATOMY, _POSE, _NOISE, _T1NOISE, _EDDY, _DROPOUT = range(7)


# --- small geometry helpers --------------------------------------------------

#: ``Rz @ Ry @ Rx`` for right-handed angles (radians) about the scanner x, y, z axes
rotation_matrix = euler_to_matrix


def _homogeneous(linear: np.ndarray, translation) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = translation
    return m


def _apply(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ m[:3, :3].T + m[:3, 3]


def grid_affine(shape: Sequence[int], voxel_mm: float, centre) -> np.ndarray:
    """Axis-aligned LAS affine (like dcm2niix output) whose middle voxel sits at ``centre``."""
    aff = np.diag([-voxel_mm, voxel_mm, voxel_mm, 1.0])
    mid = (np.asarray(shape, float) - 1) / 2
    aff[:3, 3] = np.asarray(centre, float) - aff[:3, :3] @ mid
    return aff




# --- gradient scheme ---------------------------------------------------------

@functools.lru_cache(maxsize=16)
def gradient_directions(n: int, shell: int = 0) -> np.ndarray:
    """``n`` unit vectors spread evenly by electrostatic repulsion (DIPY ``disperse_charges``).

    Deterministic (a fixed seed per ``(n, shell)``, the same protocol for every
    subject and dataset seed); every other vector is flipped to its antipode.
    """
    from dipy.core.sphere import HemiSphere, disperse_charges

    rng = np.random.default_rng([7919, n, shell])
    theta = np.arccos(rng.uniform(0, 1, n))
    phi = rng.uniform(0, 2 * np.pi, n)
    hemi, _ = disperse_charges(HemiSphere(theta=theta, phi=phi), 1000)
    v = np.asarray(hemi.vertices, float)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[1::2] *= -1
    return v


def b_table(protocol: Protocol, directions: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(bvals (N,), bvecs (N, 3)) with the b0s interleaved, the first volume a b0.

    The vectors are unit vectors in the image's voxel frame (see ``docs/simulation.md``).
    """
    dwi_b, dwi_g = [], []
    for s, (b, n) in enumerate(protocol.shells):
        n = int(directions or n)
        dwi_b += [float(b)] * n
        dwi_g.append(gradient_directions(n, s))
    dwi_g = np.concatenate(dwi_g)
    total = len(dwi_b) + protocol.n_b0
    b0_at = {int(round(i * total / protocol.n_b0)) for i in range(protocol.n_b0)}
    bvals, bvecs, k = [], [], 0
    for i in range(total):
        if i in b0_at:
            bvals.append(0.0)
            bvecs.append(np.zeros(3))
        else:
            bvals.append(dwi_b[k])
            bvecs.append(dwi_g[k])
            k += 1
    return np.array(bvals), np.array(bvecs)


# --- the template ------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _raw_template() -> dict:
    """The MNI152 2009a maps at 1 mm (:mod:`bids_adhd.dmri.mni152`), cropped to the brain (+ margin).

    The simulator scales the files' 0..255 integers by ``float32(1/255)``;
    nilearn's loaders divide by 255, which differs in the last bit for 126 of
    the 256 values. The simulator keeps its own scaling so that a seed gives
    the same dataset as before the loaders were merged.
    """
    raw = mni152.raw_1mm()
    imgs = {key: (raw[key].astype(np.float32) * np.float32(1 / 255), np.array(raw["affine"]))
            for key in ("t1", "gm", "wm")}
    t1, affine = imgs["t1"]
    brain_full = t1 > 0.2                     # = nilearn.datasets.load_mni152_brain_mask(threshold=0.2)
    # crop to the brain's bounding box plus a margin (smaller arrays, faster sampling)
    lo, hi = [], []
    for axis in range(3):
        used = np.flatnonzero(brain_full.any(axis=tuple(a for a in range(3) if a != axis)))
        lo.append(max(int(used[0]) - 6, 0))
        hi.append(min(int(used[-1]) + 7, brain_full.shape[axis]))
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    brain = brain_full[sl].astype(np.float32)
    wm = imgs["wm"][0][sl] * brain
    gm = imgs["gm"][0][sl] * brain
    csf = np.clip(brain - gm - wm, 0, None)
    crop_aff = affine.copy()
    crop_aff[:3, 3] = affine[:3, :3] @ np.array(lo, float) + affine[:3, 3]
    region = effect_region_mask(wm, crop_aff)
    return {"t1": np.ascontiguousarray(t1[sl]), "gm": gm, "wm": wm, "csf": csf, "brain": brain,
            "effect": region.astype(np.float32), "affine": crop_aff,
            "full_shape": brain_full.shape, "full_affine": affine, "crop_lo": np.array(lo)}


def effect_region_mask(wm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The named region on an axis-aligned template grid: MNI box ∩ WM probability > 0.5."""
    inside = wm > EFFECT_WM_THRESHOLD
    for axis, key in enumerate("xyz"):
        lo, hi = EFFECT_BOX_MM[key]
        coord = affine[axis, axis] * np.arange(wm.shape[axis]) + affine[axis, 3]
        ok = (coord >= lo) & (coord <= hi)
        inside &= ok.reshape([-1 if a == axis else 1 for a in range(3)])
    return inside


#: channels of the sampling stack (the T1 is kept apart)
_CHANNELS = ("wm", "gm", "csf", "brain", "effect")


@functools.lru_cache(maxsize=4)
def _template(voxel_mm: float) -> dict:
    """Maps smoothed with FWHM = ``voxel_mm`` (partial volume of a DWI voxel), stacked
    channel-last for trilinear sampling. The effect mask and the T1 stay unsmoothed."""
    from scipy.ndimage import binary_dilation, gaussian_filter

    raw = _raw_template()
    sigma = voxel_mm / (2 * math.sqrt(2 * math.log(2)))       # mm == voxels at 1 mm
    chans = []
    for key in _CHANNELS + ("t1",):
        a = raw[key]
        if key in ("gm", "wm", "csf", "brain"):
            a = gaussian_filter(a, sigma, mode="constant", truncate=3.0)
        chans.append(a)
    stack = np.stack(chans[:-1]).astype(np.float32)
    # where the trilinear value of any tissue channel can be non-zero, at nearest-voxel lookup
    support = binary_dilation(stack[_CHANNELS.index("brain")] > 1e-4, iterations=1)
    return {"stack": stack, "t1": chans[-1][None].astype(np.float32), "support": support,
            "affine": raw["affine"], "inv_affine": np.linalg.inv(raw["affine"])}


def _index_points(shape, matrix: np.ndarray) -> np.ndarray:
    """``matrix`` (4x4) applied to every voxel index of ``shape``: (N, 3) float64.

    Voxels are listed in Fortran (NIfTI) order: the first index varies fastest.
    """
    X, Y, Z = (int(n) for n in shape)
    out = np.empty((Z, Y, X, 3))
    i = np.arange(X, dtype=np.float64)[None, None, :]
    j = np.arange(Y, dtype=np.float64)[None, :, None]
    k = np.arange(Z, dtype=np.float64)[:, None, None]
    for r in range(3):
        out[..., r] = matrix[r, 0] * i + matrix[r, 1] * j + matrix[r, 2] * k + matrix[r, 3]
    return out.reshape(-1, 3)


def _trilinear(stack: np.ndarray, vox: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of every channel of ``stack`` (C, X, Y, Z) at voxel
    coordinates ``vox`` (N, 3); 0 outside the grid. Returns (N, C) float32."""
    n_ch = stack.shape[0]
    shape = np.array(stack.shape[1:])
    flat = stack.reshape(n_ch, -1)
    inside = np.all((vox >= 0) & (vox <= shape - 1), axis=1)
    v = vox[inside]
    i0 = np.minimum(v.astype(np.intp), shape - 2)          # v >= 0, so astype == floor
    d1 = (v - i0).astype(np.float32)
    d0 = 1 - d1
    sy, sz = int(shape[1] * shape[2]), int(shape[2])
    base = i0[:, 0] * sy + i0[:, 1] * sz + i0[:, 2]
    acc = np.zeros((n_ch, len(v)), np.float32)
    for ox, wx in ((0, d0[:, 0]), (sy, d1[:, 0])):
        for oy, wy in ((0, d0[:, 1]), (sz, d1[:, 1])):
            wxy = wx * wy
            for oz, wz in ((0, d0[:, 2]), (1, d1[:, 2])):
                w = wxy * wz
                idx = base + (ox + oy + oz)
                for c in range(n_ch):
                    acc[c] += w * flat[c].take(idx)
    out = np.zeros((len(vox), n_ch), np.float32)
    out[inside] = acc.T
    return out


# --- subject parameters --------------------------------------------------------

@dataclass
class Subject:
    label: str
    index: int
    diagnosis: str
    age: float
    sex: str
    site: str
    fa_scale: float = 1.0
    md_scale: float = 1.0
    size_scale: float = 1.0
    fa_waves: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))   # wave vectors (rad/mm)
    fa_phases: np.ndarray = field(default_factory=lambda: np.zeros(0))
    fa_amplitudes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    directions: int | None = None
    # hooks of the realistic profile (simulate_realistic.py); None/1.0 = the demo phantom
    warp: object = None           # callable: subject-head mm (N, 3) -> template mm (N, 3)
    fa_effect: object = None      # callable: template mm (N, 3) -> (FA factor (N,), effect region (N,) bool)
    s0_scale: float = 1.0         # site intensity scale of the b0 signal


@dataclass
class Run:
    """One session of one subject: head pose and per-volume motion."""

    session: str | None
    rotation_deg: np.ndarray
    translation_mm: np.ndarray
    moved: dict             # volume index -> (rot (3,) radians, trans (3,) mm)


def _participants(n: int, seed: int) -> list[Subject]:
    rng = np.random.default_rng([seed, _PARTICIPANTS, n])
    diag = np.array([DIAGNOSES[0]] * (n // 2) + [DIAGNOSES[1]] * (n - n // 2))
    diag = diag[rng.permutation(n)]
    ages = np.round(rng.uniform(7.0, 17.0, n), 1)
    sexes = rng.choice(["M", "F"], size=n, p=[0.6, 0.4])
    sites = rng.choice(SITES, size=n)
    width = max(2, len(str(n)))
    out = []
    for i in range(n):
        s = Subject(label=f"{i + 1:0{width}d}", index=i, diagnosis=str(diag[i]), age=float(ages[i]),
                    sex=str(sexes[i]), site=str(sites[i]))
        # Anatomy depends only on (seed, subject index): not on n, diagnosis or effect.
        a = np.random.default_rng([seed, _ANATOMY, i])
        s.fa_scale = float(1 + np.clip(a.normal(0, GLOBAL_JITTER_SD), -0.05, 0.05))
        s.md_scale = float(1 + np.clip(a.normal(0, GLOBAL_JITTER_SD), -0.05, 0.05))
        s.size_scale = float(1 + a.uniform(-SIZE_SCALE_MAX, SIZE_SCALE_MAX))
        k = FA_FIELD_WAVES
        dirs = a.normal(size=(k, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        wavelength = a.uniform(*FA_FIELD_WAVELENGTH_MM, size=k)
        s.fa_waves = dirs * (2 * np.pi / wavelength)[:, None]
        s.fa_phases = a.uniform(0, 2 * np.pi, k)
        s.fa_amplitudes = a.normal(0, FA_FIELD_SD * math.sqrt(2.0 / k), k)
        out.append(s)
    return out


def _run_params(seed: int, subject: Subject, ses_index: int, session: str | None, n_volumes: int) -> Run:
    rng = np.random.default_rng([seed, _POSE, subject.index, ses_index])
    rot = rng.uniform(-POSE_MAX_ROT_DEG, POSE_MAX_ROT_DEG, 3)
    trans = rng.uniform(-POSE_MAX_SHIFT_MM, POSE_MAX_SHIFT_MM, 3)
    n_moved = min(int(rng.integers(MOTION_VOLUMES[0], MOTION_VOLUMES[1] + 1)), n_volumes - 1)
    which = np.sort(rng.choice(np.arange(1, n_volumes), size=n_moved, replace=False))
    moved = {}
    for v in which:
        r = np.radians(rng.uniform(-MOTION_MAX_ROT_DEG, MOTION_MAX_ROT_DEG, 3))
        t = rng.uniform(-MOTION_MAX_SHIFT_MM, MOTION_MAX_SHIFT_MM, 3)
        moved[int(v)] = (r, t)
    return Run(session=session, rotation_deg=rot, translation_mm=trans, moved=moved)


def pose_matrix(subject: Subject, run: Run) -> np.ndarray:
    """Template (MNI mm) -> scanner (mm): ``x_s = t + s R x_mni`` (s = head size scale)."""
    R = rotation_matrix(*np.radians(run.rotation_deg))
    return _homogeneous(subject.size_scale * R, run.translation_mm)


def motion_matrix(rot: np.ndarray, trans: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Scanner -> scanner: a head point at ``x`` in the reference volume is at
    ``R (x - c) + c + t`` in the moved volume (``c`` = centre of the DWI grid)."""
    R = rotation_matrix(*rot)
    return _homogeneous(R, centre + trans - R @ centre)


# --- the tissue model ----------------------------------------------------------

def fibre_direction(p: np.ndarray) -> np.ndarray:
    """Smooth principal-direction field at MNI points ``p`` (N, 3), unit vectors (N, 3).

    A positive blend of three axis fields: left-right near the midline at the
    level of the corpus callosum, inferior-superior laterally (corona
    radiata / corticospinal), anterior-posterior everywhere as a floor.
    """
    x, y, z = p[:, 0], p[:, 1], p[:, 2]

    def sig(u):
        return 0.5 * (1 + np.tanh(u / 2))

    callosal = np.exp(-0.5 * (x / 14.0) ** 2) * np.exp(-0.5 * ((z - 18.0) / 12.0) ** 2) \
        * sig((y + 40.0) / 5.0) * sig((35.0 - y) / 5.0)
    lateral = sig((np.abs(x) - 18.0) / 5.0) * np.exp(-0.5 * ((y + 15.0) / 30.0) ** 2) * sig((z + 20.0) / 8.0)
    ap = 0.35 + 0.25 * sig((np.abs(y + 15.0) - 35.0) / 8.0)
    v = np.stack([2.0 * callosal + 0.15 * np.sin(y / 25.0) ** 2, ap, 1.5 * lateral], axis=1)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _fa_field(p: np.ndarray, subject: Subject) -> np.ndarray:
    if not len(subject.fa_amplitudes):
        return np.ones(len(p))
    phase = p @ subject.fa_waves.T + subject.fa_phases
    f = 1 + np.cos(phase) @ subject.fa_amplitudes
    return np.clip(f, 0.9, 1.1)


def fa_to_k(fa):
    """Cylindrical tensor with AD = MD(1+2k), RD = MD(1-k) has FA = sqrt(3) k / sqrt(1+2k²)."""
    fa = np.asarray(fa, dtype=np.float64)
    return fa / np.sqrt(3 - 2 * fa ** 2)


def cylinder_fa_md(lpar, lperp):
    lpar = np.asarray(lpar, np.float64)
    lperp = np.asarray(lperp, np.float64)
    md = (lpar + 2 * lperp) / 3
    den = np.sqrt(lpar ** 2 + 2 * lperp ** 2)
    fa = np.divide(np.abs(lpar - lperp), den, out=np.zeros_like(den), where=den > 0)
    return fa, md


def tissue_at(p: np.ndarray, subject: Subject, effect: float, tmpl: dict) -> dict:
    """Every property of the phantom at template points ``p`` (N, 3) in MNI mm.

    Returns float64 arrays: ``brain`` (fraction of the voxel that is brain),
    ``wm``/``gm``/``csf`` (tissue fractions of the brain part, summing to 1),
    ``s0``, ``fa``, ``md``, ``ad``, ``rd``, ``e`` (N, 3, template frame) and
    ``effect`` (bool: inside the named region). Outside the brain all are 0.
    """
    vals = _trilinear(tmpl["stack"], _apply(tmpl["inv_affine"], p))
    pw, pg, pc = (np.clip(vals[:, _CHANNELS.index(c)], 0, None).astype(np.float64) for c in ("wm", "gm", "csf"))
    brain = np.clip(vals[:, _CHANNELS.index("brain")], 0, 1).astype(np.float64)
    region = vals[:, _CHANNELS.index("effect")] >= 0.5
    total = pw + pg + pc
    valid = (total > 1e-4) & (brain > 1e-4)
    safe = np.where(valid, total, 1.0)
    ww, wg, wc = (np.where(valid, q / safe, 0.0) for q in (pw, pg, pc))
    brain = np.where(valid, brain, 0.0)

    # tissue tensors (cylindrical, shared direction) -> tissue-weighted mix
    k_wm = fa_to_k(WM_FA_BASE + WM_FA_SLOPE * ww)
    k_gm = fa_to_k(GM_FA)
    lpar = ww * WM_MD * (1 + 2 * k_wm) + wg * GM_MD * (1 + 2 * k_gm) + wc * CSF_MD
    lperp = ww * WM_MD * (1 - k_wm) + wg * GM_MD * (1 - k_gm) + wc * CSF_MD
    fa, md = cylinder_fa_md(lpar, lperp)

    # subject variation and the effect act on (FA, MD); back to eigenvalues in closed form
    fa = fa * _fa_field(p, subject) * subject.fa_scale
    md = md * subject.md_scale
    if effect and subject.diagnosis == DIAGNOSES[0]:
        fa = np.where(region, fa * (1 - effect), fa)
    if subject.fa_effect is not None:             # realistic profile: regional variation and effects
        factor, region = subject.fa_effect(p)
        fa = fa * factor
    fa = np.where(valid, np.clip(fa, 0, 0.95), 0.0)
    md = np.where(valid, md, 0.0)
    k = fa_to_k(fa)
    ad = md * (1 + 2 * k)
    rd = md * (1 - k)
    s0 = brain * (ww * S0_WM + wg * S0_GM + wc * S0_CSF)
    if subject.s0_scale != 1.0:
        s0 = s0 * subject.s0_scale
    return {"brain": brain, "wm": ww, "gm": wg, "csf": wc, "s0": s0, "fa": fa, "md": md,
            "ad": ad, "rd": rd, "e": fibre_direction(p), "effect": region & valid}


def _template_voxels(shape, index_to_mni: np.ndarray, subject: Subject, tmpl: dict) -> np.ndarray:
    """Template voxel coordinates (N, 3) of every voxel of a grid; through the subject's
    non-linear warp when it has one (realistic profile)."""
    if subject.warp is None:
        return _index_points(shape, tmpl["inv_affine"] @ index_to_mni)
    return _apply(tmpl["inv_affine"], subject.warp(_index_points(shape, index_to_mni)))


def _phantom_on_grid(shape, index_to_mni: np.ndarray, subject: Subject, effect: float, tmpl: dict) -> dict:
    """``tissue_at`` for the voxels of a grid (``index_to_mni``: voxel index -> MNI mm) that
    can hold brain; ``index`` lists them (flat, Fortran order), the rest are 0."""
    vox = _template_voxels(shape, index_to_mni, subject, tmpl)
    near = np.rint(vox).astype(np.intp)
    tshape = np.array(tmpl["support"].shape)
    ok = np.all((near >= 0) & (near < tshape), axis=1)
    cand = np.flatnonzero(ok)
    n = near[cand]
    cand = cand[tmpl["support"][n[:, 0], n[:, 1], n[:, 2]]]
    props = tissue_at(_apply(tmpl["affine"], vox[cand]), subject, effect, tmpl)
    keep = props["brain"] > 0
    props = {k: v[keep] for k, v in props.items()}
    props["index"] = cand[keep]
    props["n_voxels"] = int(np.prod(shape))
    return props


def _full(props: dict, key: str, shape, dtype=np.float32) -> np.ndarray:
    """A compact per-voxel property as a full 3D volume (0 outside the brain)."""
    out = np.zeros(props["n_voxels"], dtype)
    out[props["index"]] = props[key]
    return out.reshape(tuple(shape), order="F")


# --- one run -----------------------------------------------------------------

def _nifti(data, affine, zooms=None, dtype=None):
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data), affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    hdr = img.header
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    if zooms is not None:
        hdr.set_zooms(zooms)
    return img


def _rician(signal: np.ndarray, sigma: float, rng) -> np.ndarray:
    n = rng.standard_normal((2,) + signal.shape, dtype=np.float32)
    return np.sqrt((signal + sigma * n[0]) ** 2 + (sigma * n[1]) ** 2)


def eddy_voxel_matrices(seed: int, subject: Subject, ses_index: int, bvals, g_world, shape, voxel_mm) -> np.ndarray:
    """(N, 4, 4) eddy-current distortions in voxel coordinates: a point at voxel ``p`` of the
    undistorted (moved) volume appears at ``P @ [p, 1]`` of the acquired one; only row
    ``EDDY_PE_AXIS`` differs from the identity. b0 volumes: identity."""
    rng = np.random.default_rng([seed, _EDDY, subject.index, ses_index])
    coeff = rng.uniform(*EDDY_COEFF_RANGE, 3) * rng.choice([-1.0, 1.0], 3)   # per gradient axis x, y, z
    shift = rng.uniform(-EDDY_SHIFT_MM_MAX, EDDY_SHIFT_MM_MAX, 3)
    c = (np.asarray(shape, float) - 1) / 2
    out = np.repeat(np.eye(4)[None], len(bvals), 0)
    for v, (b, g) in enumerate(zip(bvals, g_world)):
        if b <= 0:
            continue
        k = b / 1000.0
        # gradient x -> shear along i, y -> scale along j, z -> shear along k (in voxel units)
        row = np.zeros(3)
        row[0], row[1], row[2] = k * coeff[0] * g[0], k * coeff[1] * g[1], k * coeff[2] * g[2]
        out[v, EDDY_PE_AXIS, :3] += row
        out[v, EDDY_PE_AXIS, 3] += k * float(shift @ g) / voxel_mm - row @ c
    return out


def dropout_slices(seed: int, subject: Subject, ses_index: int, bvals, brain_slices) -> list:
    """[(volume, slice, remaining signal fraction)] of one run: DW volumes, slices inside the brain."""
    rng = np.random.default_rng([seed, _DROPOUT, subject.index, ses_index])
    dw = np.flatnonzero(np.asarray(bvals) > 0)
    n = int(rng.integers(DROPOUTS_PER_RUN[0], DROPOUTS_PER_RUN[1] + 1))
    vols = rng.choice(dw, size=min(n, dw.size), replace=False)
    return sorted((int(v), int(rng.choice(brain_slices)), float(rng.uniform(*DROPOUT_SIGNAL))) for v in vols)


def _distort(sig: np.ndarray, P: np.ndarray, shape) -> np.ndarray:
    """The flat (Z, Y, X C-order) signal of one volume seen through the eddy distortion ``P``
    (cubic spline resampling: acquired(p) = undistorted(P^-1 p))."""
    from scipy.ndimage import affine_transform

    vol = sig.reshape(tuple(shape)[::-1]).T
    Pi = np.linalg.inv(P)
    out = affine_transform(vol, Pi[:3, :3], Pi[:3, 3], order=3, mode="constant", cval=0.0)
    return np.maximum(out, 0).T.ravel().astype(np.float32)


def _simulate_run(root: Path, truth_root: Path, subject: Subject, run: Run, ses_index: int,
                  protocol: Protocol, effect: float, snr: float, seed: int, motion: bool, eddy: bool = True,
                  dropouts: bool = True) -> dict:
    """Write one subject/session: raw DWI + T1w, and its truth. Returns a summary."""
    tmpl = _template(protocol.voxel_mm)
    noise = bool(snr) and math.isfinite(snr)
    bvals, bvecs = b_table(protocol, subject.directions)
    n_vol = len(bvals)
    if not motion:
        run.moved = {}

    P = pose_matrix(subject, run)
    P_inv = np.linalg.inv(P)
    centre = _apply(P, np.array([BRAIN_CENTRE_MNI]))[0]
    affine = grid_affine(protocol.shape, protocol.voxel_mm, centre)
    # gradient directions: bvec file is in the voxel frame; the scanner (world) frame
    # vector is the affine's rotation part applied to it: here diag(-1, 1, 1) (LAS).
    g_world = bvecs @ (affine[:3, :3] / protocol.voxel_mm).T
    ref = _phantom_on_grid(protocol.shape, P_inv @ affine, subject, effect, tmpl)
    shape = tuple(protocol.shape)
    eddy_p = (eddy_voxel_matrices(seed, subject, ses_index, bvals, g_world, shape, protocol.voxel_mm) if eddy
              else np.repeat(np.eye(4)[None], n_vol, 0))
    area = _full(ref, "brain", shape).sum(axis=(0, 1))
    brain_k = np.flatnonzero(area >= 0.3 * area.max())            # slices well inside the brain
    drops = dropout_slices(seed, subject, ses_index, bvals, brain_k) if dropouts else []
    data = _dwi_signal(ref, _moved_phantoms(run, subject, protocol, P_inv, affine, centre, effect, tmpl),
                       rotation_matrix(*np.radians(run.rotation_deg)), bvals, g_world, eddy_p, drops, shape,
                       S0_WM / snr if noise else None, np.random.default_rng([seed, _NOISE, subject.index, ses_index]))

    src = _d.Source(subject=subject.label, session=run.session)
    sub_dir = root / f"sub-{subject.label}" / (f"ses-{run.session}" if run.session else "")
    _write_raw_dwi(sub_dir / "dwi", src.prefix, data, affine, bvals, bvecs, protocol, noise)
    t1_aff = _write_t1(sub_dir / "anat", src.prefix, protocol, P_inv, centre, subject, tmpl,
                       np.random.default_rng([seed, _T1NOISE, subject.index, ses_index]) if noise else None)
    # --- truth (native DWI space, reference = volume 0) ---
    tdir = truth_root / f"sub-{subject.label}" / (f"ses-{run.session}" if run.session else "") / "dwi"
    _write_map_truth(tdir, src.prefix, ref, shape, affine)
    _d.write_json(tdir / f"{src.prefix}_desc-pose_xfm.json", _pose_truth(P, P_inv, run, subject, affine, t1_aff,
                                                                     centre))
    _write_motion_truth(tdir, src.prefix, run, n_vol, centre)
    _write_artefact_truth(tdir, src.prefix, affine, eddy_p, drops, n_vol, shape)
    return {"session": run.session, "rotation_deg": run.rotation_deg, "translation_mm": run.translation_mm,
            "moved_volumes": sorted(run.moved), "n_volumes": n_vol, "dropouts": [[v, k] for v, k, _ in drops],
            "eddy": bool(eddy),
            "effect_voxels": int(ref["effect"].sum()), "brain_voxels": int(ref["brain_mask"].sum())}


def _moved_phantoms(run: Run, subject: Subject, protocol: Protocol, P_inv, affine, centre, effect: float,
                    tmpl) -> dict:
    """Volume → (the phantom seen through that volume's head motion, the head's rotation)."""
    R_pose = rotation_matrix(*np.radians(run.rotation_deg))
    out = {}
    for v, (rot, trans) in run.moved.items():
        M = motion_matrix(rot, trans, centre)
        out[v] = (_phantom_on_grid(protocol.shape, P_inv @ np.linalg.inv(M) @ affine, subject, effect, tmpl),
                  rotation_matrix(*rot) @ R_pose)
    return out


def _dwi_signal(ref: dict, moved_props: dict, R_pose, bvals, g_world, eddy_p, drops, shape, sigma,
                rng) -> np.ndarray:
    """(X, Y, Z, V): the tensor signal of every volume, eddy-distorted, with its slice dropouts and
    Rician noise (``sigma`` None: none, float32; else rounded to int16)."""
    n_vol, n_vox = len(bvals), ref["n_voxels"]
    noise = sigma is not None
    data = np.empty((n_vol, n_vox), dtype=np.int16 if noise else np.float32)   # volume-major: (V, Z, Y, X)
    sig = np.empty(n_vox, np.float32)
    for v in range(n_vol):
        props, R = moved_props.get(v, (ref, R_pose))
        sig[:] = 0
        if bvals[v] > 0:
            g_head = R.T @ g_world[v]                                  # gradient in the head frame
            proj = props["e"] @ g_head
            adc = props["rd"] + (props["ad"] - props["rd"]) * proj ** 2
            sig[props["index"]] = props["s0"] * np.exp(-bvals[v] * adc)
        else:
            sig[props["index"]] = props["s0"]
        if not np.allclose(eddy_p[v], np.eye(4)):
            sig[:] = _distort(sig, eddy_p[v], shape)
        for dv, dk, frac in drops:
            if dv == v:                          # flat index: k is the slowest axis
                sig.reshape(shape[::-1])[dk] *= frac
        if noise:
            data[v] = np.minimum(np.rint(_rician(sig, sigma, rng)), np.iinfo(np.int16).max)
        else:
            data[v] = sig
    return data.reshape((n_vol,) + tuple(shape)[::-1]).T     # (X, Y, Z, V), Fortran order


def _write_raw_dwi(dwi_dir: Path, prefix: str, data, affine, bvals, bvecs, protocol: Protocol,
                   noise: bool) -> None:
    """The raw DWI series: NIfTI, .bval, .bvec (voxel frame), sidecar."""
    zooms = (protocol.voxel_mm,) * 3 + (protocol.repetition_time,)
    img = _nifti(data, affine, zooms)
    if noise:
        img.header.set_slope_inter(1.0, 0.0)
    _d.write_nifti(dwi_dir / f"{prefix}_dwi.nii.gz", img)
    _d.write_text(dwi_dir / f"{prefix}_dwi.bval", " ".join(f"{int(b)}" for b in bvals) + "\n")
    _d.write_text(dwi_dir / f"{prefix}_dwi.bvec",
                  "\n".join(" ".join(f"{c:.6f}" if c != 0 else "0" for c in row) for row in bvecs.T) + "\n")
    _d.write_json(dwi_dir / f"{prefix}_dwi.json", {
        "PhaseEncodingDirection": "j-", "TotalReadoutTime": protocol.total_readout_time,
        "EchoTime": protocol.echo_time, "RepetitionTime": protocol.repetition_time,
        "MagneticFieldStrength": 3, "Manufacturer": "bids_adhd simulator",
        "ManufacturersModelName": f"bids_adhd {__version__} simulate (size {protocol.name})",
        "SliceEncodingDirection": "k",
    })


def _write_t1(anat_dir: Path, prefix: str, protocol: Protocol, P_inv, centre, subject: Subject, tmpl,
              rng) -> np.ndarray:
    """T1w: the template T1 moved by the same head pose, on a grid centred on the head (``rng``
    None: no noise). Returns its affine."""
    t1_aff = grid_affine(protocol.t1_shape, protocol.t1_voxel_mm, centre)
    vox = _template_voxels(protocol.t1_shape, P_inv @ t1_aff, subject, tmpl)
    t1 = 1000.0 * _trilinear(tmpl["t1"], vox)[:, 0]
    if rng is not None:
        t1 = _rician(t1, 10.0, rng)
    t1 = np.minimum(np.rint(t1), 32767).astype(np.int16)
    t1_img = _nifti(t1.reshape(protocol.t1_shape, order="F"), t1_aff)
    t1_img.header.set_slope_inter(1.0, 0.0)
    _d.write_nifti(anat_dir / f"{prefix}_T1w.nii.gz", t1_img)
    _d.write_json(anat_dir / f"{prefix}_T1w.json", {
        "RepetitionTime": 2.5, "EchoTime": 0.0035, "InversionTime": 1.06, "FlipAngle": 8,
        "MagneticFieldStrength": 3, "Manufacturer": "bids_adhd simulator"})
    return t1_aff


def _write_map_truth(tdir: Path, prefix: str, ref: dict, shape, affine) -> None:
    """The truth tensor maps, brain mask, tissue fractions and effect mask (adds ``ref["brain_mask"]``)."""
    for param in ("fa", "md", "ad", "rd"):
        _d.write_nifti(tdir / f"{prefix}_model-tensor_param-{param}_dwimap.nii.gz",
                       _nifti(_full(ref, param, shape), affine))
    ref["brain_mask"] = ref["brain"] >= 0.5
    _d.write_nifti(tdir / f"{prefix}_desc-brain_mask.nii.gz", _nifti(_full(ref, "brain_mask", shape, np.uint8), affine))
    for label in ("WM", "GM", "CSF"):
        ref[f"{label}_fraction"] = ref[label.lower()] * ref["brain"]
        _d.write_nifti(tdir / f"{prefix}_label-{label}_probseg.nii.gz",
                       _nifti(_full(ref, f"{label}_fraction", shape), affine))
    _d.write_nifti(tdir / f"{prefix}_desc-effect_mask.nii.gz", _nifti(_full(ref, "effect", shape, np.uint8), affine))


def _pose_truth(P, P_inv, run: Run, subject: Subject, affine, t1_aff, centre) -> dict:
    """The head pose of one run (template ↔ scanner), as ``_desc-pose_xfm.json`` holds it."""
    return {
        "Description": "Head pose: maps template (MNI152NLin2009aSym, mm) points to this run's "
                       "scanner (world, mm) points at the reference volume 0: x_scanner = "
                       "TemplateToScanner @ [x_mni, 1]. TemplateToScanner = [[s*R, t], [0, 1]] with "
                       "R = Rz(rz) @ Ry(ry) @ Rx(rx) (right-handed, about the scanner axes, through the "
                       "MNI origin), s = Scale, t = TranslationMm.",
        "FromSpace": TEMPLATE_SPACE, "ToSpace": "scanner",
        "TemplateToScanner": P, "ScannerToTemplate": P_inv,
        "RotationDegrees": run.rotation_deg, "RotationOrder": "R = Rz @ Ry @ Rx",
        "TranslationMm": run.translation_mm, "Scale": subject.size_scale,
        "DwiAffine": affine, "T1wAffine": t1_aff, "HeadCentreScannerMm": centre,
    }


def _write_motion_truth(tdir: Path, prefix: str, run: Run, n_vol: int, centre) -> None:
    """The simulated per-volume head motion: ``_desc-motion_timeseries.tsv`` and its sidecar."""
    rows = {k: [] for k in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")}
    mats = []
    for v in range(n_vol):
        rot, trans = run.moved.get(v, (np.zeros(3), np.zeros(3)))
        for i, a in enumerate("xyz"):
            rows[f"trans_{a}"].append(float(trans[i]))
            rows[f"rot_{a}"].append(float(rot[i]))
        mats.append(motion_matrix(rot, trans, centre))
    _d.write_tsv(tdir / f"{prefix}_desc-motion_timeseries.tsv", rows, float_fmt="{:.8f}")
    _d.write_json(tdir / f"{prefix}_desc-motion_timeseries.json", {
        "Description": "Simulated head motion per DWI volume, relative to volume 0 (the reference, never "
                       "moved), in the scanner (world, mm) frame. Volume v's matrix M_v maps a head point's "
                       "scanner position in volume 0 to its position in volume v: x_v = M_v @ [x_0, 1], "
                       "M_v = [[R, c + t - R c], [0, 1]], R = Rz(rot_z) @ Ry(rot_y) @ Rx(rot_x), c = "
                       "RotationCentreMm (the DWI grid centre), t = (trans_x, trans_y, trans_z). To undo it, "
                       "sample volume v at M_v @ x for every reference-grid point x (M_v is the static-to-"
                       "moving map an image registration of volume v to volume 0 estimates). The signal of a "
                       "moved volume was simulated with the head-frame gradient g_head = (R R_pose)^T g_scanner; "
                       "the .bvec file holds the unrotated directions of the scanner's gradient axes (written "
                       "on the image axes, BIDS/FSL convention), as a scanner writes them.",
        "trans_x": {"Units": "mm"}, "trans_y": {"Units": "mm"}, "trans_z": {"Units": "mm"},
        "rot_x": {"Units": "rad"}, "rot_y": {"Units": "rad"}, "rot_z": {"Units": "rad"},
        "RotationCentreMm": centre, "MovedVolumes": sorted(run.moved), "Matrices": mats,
    })


def _write_artefact_truth(tdir: Path, prefix: str, affine, eddy_p, drops, n_vol: int, shape) -> None:
    """Eddy-current and slice-dropout truth, in files of their own (the motion truth stays rigid)."""
    world = [affine @ P @ np.linalg.inv(affine) for P in eddy_p]
    _d.write_json(tdir / f"{prefix}_desc-eddy_xfm.json", {
        "Description": "Simulated eddy-current distortion per DWI volume, in the acquired volume's own frame: "
                       "a point at world position x of the undistorted (head-moved) volume v appears at "
                       "Matrices[v] @ [x, 1] in the acquired image, so the whole reference -> acquired map is "
                       "Matrices[v] @ M_v with M_v the rigid motion of desc-motion_timeseries.json. "
                       "VoxelMatrices[v] is the same map in voxel indices: identity except the row of the "
                       "phase-encoding axis (displacement along it = linear function of position). b0: identity.",
        "PhaseEncodingAxis": EDDY_PE_AXIS, "Matrices": world, "VoxelMatrices": [np.asarray(P) for P in eddy_p],
        "Model": {"coefficient_range": EDDY_COEFF_RANGE, "shift_mm_max": EDDY_SHIFT_MM_MAX,
                  "scaling": "each term proportional to one scanner-frame gradient component and to b/1000"},
    })
    counts = np.zeros(n_vol, int)
    for v, _, _ in drops:
        counts[v] += 1
    _d.write_tsv(tdir / f"{prefix}_desc-dropout_timeseries.tsv", {"dropout_slices": [int(c) for c in counts]})
    _d.write_json(tdir / f"{prefix}_desc-dropout_timeseries.json", {
        "Description": "Simulated slice dropouts: in volume v, slice k (along SliceAxis, in the acquired "
                       "volume's own voxel grid) the noise-free signal was multiplied by SignalFraction before "
                       "the noise was added.",
        "SliceAxis": DROPOUT_SLICE_AXIS, "Slices": [[v, k] for v, k, _ in drops],
        "SignalFraction": [f for _, _, f in drops],
        "dropout_slices": {"Description": "number of dropout slices per volume"},
    })


# --- the dataset ---------------------------------------------------------------

def _check_args(n_subjects, seed, size, effect, snr, sessions, directions, n_jobs=1):
    if size not in SIZES:
        raise UsageError(f"--size must be one of {', '.join(SIZES)} (got {size!r})")
    if isinstance(n_subjects, bool) or not isinstance(n_subjects, (int, np.integer)) or n_subjects < 2:
        raise UsageError(f"--subjects must be an integer of at least 2 (got {n_subjects!r})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"--seed must be a non-negative integer (got {seed!r})")
    try:
        effect = float(effect)
    except (TypeError, ValueError):
        raise UsageError(f"--effect must be a number in [0, 0.9) (got {effect!r})") from None
    if not 0.0 <= effect < 0.9:
        raise UsageError(f"--effect must be a fraction in [0, 0.9) (got {effect})")
    try:
        snr = float(snr)
    except (TypeError, ValueError):
        raise UsageError(f"--snr must be a positive number, or 0/inf for no noise (got {snr!r})") from None
    if math.isnan(snr) or snr < 0:
        raise UsageError(f"--snr must be positive, or 0/inf for no noise (got {snr})")
    if isinstance(sessions, bool) or not isinstance(sessions, (int, np.integer)) or sessions < 1:
        raise UsageError(f"--sessions must be an integer of at least 1 (got {sessions!r})")
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1:
        raise UsageError(f"--nprocs must be a positive integer (got {n_jobs!r})")
    if directions is not None:
        seq = [directions] if isinstance(directions, (int, np.integer)) else list(directions)
        if not seq or any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 6 for d in seq):
            raise UsageError(f"--directions must be at least 6 per shell (a tensor has 6 unknowns) "
                             f"(got {directions!r})")
    return effect, snr


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise OutputError(f"{out_dir} exists and is not a directory; choose a new OUT_DIR")
        if any(out_dir.iterdir()):
            raise OutputError(f"{out_dir} exists and is not empty; choose a new OUT_DIR or remove it")


@contextlib.contextmanager
def _staging_dir(out_dir: Path):
    """A temporary folder beside ``out_dir``, renamed onto it on success, removed on failure."""
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".simulate-tmp", dir=parent))
    except OSError as exc:
        raise OutputError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    try:
        yield tmp
        _usual_permissions(tmp)
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _usual_permissions(root: Path) -> None:
    """Temporary files/folders are created private (0600/0700); give the dataset the
    permissions of ordinary new files (0666/0777 minus the umask) so others can read it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def _directions_for(directions, i):
    if directions is None or isinstance(directions, (int, np.integer)):
        return None if directions is None else int(directions)
    seq = list(directions)
    return int(seq[i % len(seq)])


def effect_region_info() -> dict:
    """Size of the named region at MNI 1 mm (voxels = mm³)."""
    raw = _raw_template()
    n = int(raw["effect"].sum())
    wm = int((raw["wm"] > EFFECT_WM_THRESHOLD).sum())
    return {"voxels_1mm": n, "volume_ml": n / 1000.0, "wm_voxels_1mm": wm,
            "fraction_of_wm": n / wm}


def _simulate_subject(root: Path, truth: Path, protocol: Protocol, effect: float, snr: float, seed: int,
                      sessions: int, motion: bool, motion_confound: float, eddy: bool, dropouts: bool,
                      s: Subject) -> list:
    """Every session of one subject (``_simulate_run``); their summaries."""
    runs = []
    for k in range(sessions):
        ses = f"{k + 1:02d}" if sessions > 1 else None
        bvals, _ = b_table(protocol, s.directions)
        run = _run_params(seed, s, k, ses, len(bvals))
        if motion_confound and s.diagnosis == DIAGNOSES[0]:
            f = 1.0 + float(motion_confound)
            run.moved = {v: (r * f, t * f) for v, (r, t) in run.moved.items()}
        runs.append(_simulate_run(root, truth, s, run, k, protocol, effect, snr, seed, motion, eddy, dropouts))
    LOG.debug("sub-%s done (%s)", s.label, s.diagnosis)
    return runs


def _map_subjects(one_subject, subjects: list, n_jobs) -> list:
    """``one_subject`` of every subject, in order, on ``n_jobs`` threads (the files do not depend on it)."""
    n_jobs = max(1, min(int(n_jobs or 1), len(subjects)))
    if n_jobs == 1:
        return [one_subject(s) for s in _progress(subjects, len(subjects))]
    # numpy and zlib release the GIL: threads overlap the compute and the gzip writes
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=n_jobs, thread_name_prefix="simulate") as pool:
        return list(_progress(pool.map(one_subject, subjects), len(subjects)))


def simulate_dataset(out_dir, n_subjects=20, seed=0, size="demo", effect=0.08, snr=25.0,
                     sessions=1, directions=None, *, motion=True, eddy=True, dropouts=True, n_jobs=1,
                     motion_confound: float = 0.0) -> Path:
    """Write a simulated BIDS dataset with a planted ADHD effect to ``out_dir``; return its path.

    Parameters
    ----------
    out_dir : path
        Must not exist, or be an empty directory. Everything is written to a
        temporary folder beside it and renamed at the end.
    n_subjects : int, at least 2
        Half ADHD, half TD (shuffled with ``seed``; TD gets the odd one).
    seed : int, non-negative
        Same seed, same files (byte for byte).
    size : ``"demo"`` or ``"hbn"``
        Acquisition (see ``SIZES``).
    effect : float in [0, 0.9)
        Fractional FA reduction in the named region for ADHD subjects (MD kept).
    snr : float
        b0 SNR in white matter (sigma = S0_WM / snr). ``0`` or ``inf``: no noise,
        and the DWI is stored as float32 (otherwise as integer-valued int16).
    sessions : int
        Sessions per subject (``ses-01``...; no session folder when 1).
    directions : int or sequence of int, optional
        Directions per shell instead of the protocol's; a sequence gives one
        count per subject (cycled).
    motion : bool
        Keyword only. ``False``: no per-volume motion (the head pose stays).
    eddy, dropouts : bool
        Keyword only. ``False``: no eddy-current distortion / no slice dropouts
        (see ``EDDY_*`` and ``DROPOUT*``; truth in ``desc-eddy_xfm.json`` and
        ``desc-dropout_timeseries.tsv/.json``).
    motion_confound : float
        Keyword only. ADHD subjects' per-volume motion (rotations and shifts of
        the moved volumes) is multiplied by ``1 + motion_confound``: a
        motion–diagnosis confound (mean FD higher with ADHD) for testing the
        group level's confound checks. 0 (default) draws the same dataset as before.
    n_jobs : int
        Keyword only. Subjects simulated at once (threads); the files do not
        depend on it.
    """
    effect, snr = _check_args(n_subjects, seed, size, effect, snr, sessions, directions, n_jobs)
    out_dir = Path(out_dir).absolute()
    _check_out_dir(out_dir)
    protocol = SIZES[size]
    n_subjects, seed, sessions = int(n_subjects), int(seed), int(sessions)
    t0 = time.perf_counter()
    LOG.info("simulating %d subjects (%s, seed %d, effect %.3g, SNR %s) into %s",
             n_subjects, size, seed, effect, snr, out_dir)
    subjects = _participants(n_subjects, seed)
    for s in subjects:
        s.directions = _directions_for(directions, s.index)

    from threadpoolctl import threadpool_limits

    with _staging_dir(out_dir) as root, threadpool_limits(1):
        truth = root / "derivatives" / "truth"
        _write_dataset_files(root, truth, subjects, protocol, effect, snr, seed, sessions, motion)
        # the shared, cached pieces first (then the worker threads only read them)
        _template(protocol.voxel_mm)
        for d in {s.directions for s in subjects}:
            b_table(protocol, d)

        one = functools.partial(_simulate_subject, root, truth, protocol, effect, snr, seed, sessions, motion,
                                motion_confound, eddy, dropouts)
        results = _map_subjects(one, subjects, n_jobs)
        summaries = {s.label: r for s, r in zip(subjects, results)}
        _write_truth_summary(root, truth, subjects, summaries, protocol, effect, snr, seed, sessions,
                             directions, motion, motion_confound, eddy, dropouts)
    LOG.info("wrote %s in %.1f s", out_dir, time.perf_counter() - t0)
    return out_dir


def _progress(items, total):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return items
    quiet = not sys.stderr.isatty() or not LOG.isEnabledFor(logging.INFO)
    return tqdm(items, total=total, desc="simulate", unit="subject", disable=quiet, file=sys.stderr)


def _write_dataset_files(root, truth, subjects, protocol, effect, snr, seed, sessions, motion):
    generated = [{"Name": "bids_adhd", "Version": __version__,
                  "Description": f"bids_adhd simulate --size {protocol.name} --seed {seed} "
                                 f"--effect {effect:g} --snr {snr:g} --sessions {sessions}"
                                 + ("" if motion else " (no motion)")}]
    _d.write_json(root / "dataset_description.json", {
        "Name": "bids_adhd simulated paediatric diffusion MRI (ADHD vs TD)",
        "BIDSVersion": "1.10.0", "DatasetType": "raw", "License": "CC0",
        "Authors": ["bids_adhd simulator"], "GeneratedBy": generated})
    _d.write_text(root / "README", (
        "Simulated diffusion MRI dataset written by `bids_adhd simulate`.\n\n"
        "Every image is synthetic: a diffusion-tensor phantom built from the MNI152 2009a (symmetric) "
        "grey/white-matter probability maps shipped with nilearn, moved by a random head pose, with "
        "a few volumes moved again (head motion) and Rician noise. Subjects with diagnosis ADHD have "
        f"white-matter FA lowered by {effect:.1%} in the '{EFFECT_REGION}' region (MD unchanged).\n\n"
        "The exact ground truth (FA/MD/AD/RD maps, tissue masks, effect region, head pose and "
        "motion per volume) is in derivatives/truth/; see truth.json there and docs/simulation.md "
        "in the bids_adhd repository for the conventions.\n"))
    _d.write_tsv(root / "participants.tsv", {
        "participant_id": [f"sub-{s.label}" for s in subjects],
        "diagnosis": [s.diagnosis for s in subjects],
        "age": [s.age for s in subjects],
        "sex": [s.sex for s in subjects],
        "site": [s.site for s in subjects]}, float_fmt="{:.1f}")
    _d.write_json(root / "participants.json", {
        "participant_id": {"Description": "Unique participant identifier"},
        "diagnosis": {"Description": "Simulated diagnostic group",
                      "Levels": {"ADHD": "attention-deficit/hyperactivity disorder (FA lowered in the "
                                         f"{EFFECT_REGION} region)",
                                 "TD": "typically developing control"}},
        "age": {"Description": "Age at scan (simulated; does not affect the images)", "Units": "year"},
        "sex": {"Description": "Sex (simulated; does not affect the images)",
                "Levels": {"M": "male", "F": "female"}},
        "site": {"Description": "Acquisition site (simulated; does not affect the images)",
                 "Levels": {k: f"site {k[-1]}" for k in SITES}}})
    _d.write_json(truth / "dataset_description.json", {
        "Name": "bids_adhd simulation ground truth", "BIDSVersion": "1.10.0",
        "DatasetType": "derivative", "GeneratedBy": generated})
    _d.write_text(truth / "README", (
        "Ground truth of the simulated dataset one level up (two folders up). Per subject/session, "
        "in the native DWI space of the raw data at the reference volume 0: the true tensor "
        "FA/MD/AD/RD (md/ad/rd in mm^2/s), brain mask, tissue fractions, the effect region, the head "
        "pose (desc-pose_xfm.json) and the per-volume motion (desc-motion_timeseries.tsv/.json). "
        "truth.json summarises the parameters.\n"))
    raw = _raw_template()
    full = np.zeros(raw["full_shape"], np.uint8)
    lo = raw["crop_lo"]
    sl = tuple(slice(a, a + n) for a, n in zip(lo, raw["effect"].shape))
    full[sl] = raw["effect"] > 0
    _d.write_nifti(truth / f"space-{TEMPLATE_SPACE}_desc-effect_mask.nii.gz", _nifti(full, raw["full_affine"]))


def _write_truth_summary(root, truth, subjects, summaries, protocol, effect, snr, seed, sessions,
                         directions, motion, motion_confound=0.0, eddy=True, dropouts=True):
    noise = bool(snr) and math.isfinite(snr)
    bvals, _ = b_table(protocol, None)
    _d.write_json(truth / "truth.json", {
        "EffectFraction": effect, "EffectRegion": EFFECT_REGION,
        "EffectRegionDefinition": {"space": TEMPLATE_SPACE, "box_mm": EFFECT_BOX_MM,
                                   "wm_probability_above": EFFECT_WM_THRESHOLD,
                                   "mask": f"space-{TEMPLATE_SPACE}_desc-effect_mask.nii.gz"},
        "EffectRegionSize": effect_region_info(),
        "EffectModel": "ADHD subjects: voxel FA x (1 - EffectFraction) in the region, MD unchanged; "
                       "TD subjects unchanged",
        "SNR": snr if noise else None, "NoiseSigma": S0_WM / snr if noise else 0.0,
        "NoiseModel": "Rician, sigma = S0_WM / SNR" if noise else "none",
        "Size": protocol.name, "Seed": seed, "Sessions": sessions, "Motion": bool(motion),
        "Grid": {"shape": protocol.shape, "voxel_size_mm": protocol.voxel_mm, "orientation": "LAS",
                 "T1w_shape": protocol.t1_shape, "T1w_voxel_size_mm": protocol.t1_voxel_mm},
        "Shells": [{"bval": b, "directions": n} for b, n in protocol.shells],
        "DirectionsOverride": directions, "NumberOfB0": protocol.n_b0,
        "NumberOfVolumes": len(bvals),
        "BvecFrame": "voxel frame of the DWI image (= FSL convention for this LAS, negative-determinant "
                     "grid); scanner-frame vector = affine[:3,:3]/voxel_size @ bvec = (-x, y, z)",
        "Tissue": {"WM": {"FA": f"{WM_FA_BASE} + {WM_FA_SLOPE} * w_wm", "MD": WM_MD, "S0": S0_WM},
                   "GM": {"FA": GM_FA, "MD": GM_MD, "S0": S0_GM},
                   "CSF": {"FA": 0.0, "MD": CSF_MD, "S0": S0_CSF},
                   "mixing": "one cylindrical tensor per voxel: tissue-fraction-weighted mean of the tissue "
                             "eigenvalues along a shared smooth fibre direction"},
        "SubjectVariation": {"pose_rotation_deg_max": POSE_MAX_ROT_DEG, "pose_shift_mm_max": POSE_MAX_SHIFT_MM,
                             "size_scale_max": SIZE_SCALE_MAX, "global_fa_md_scale_sd": GLOBAL_JITTER_SD,
                             "fa_field_sd": FA_FIELD_SD,
                             "fa_field_wavelength_mm": FA_FIELD_WAVELENGTH_MM},
        "MotionModel": {"volumes_per_run": MOTION_VOLUMES, "rotation_deg_max": MOTION_MAX_ROT_DEG,
                        "shift_mm_max": MOTION_MAX_SHIFT_MM,
                        "adhd_motion_factor": 1.0 + float(motion_confound)},
        "Eddy": bool(eddy), "Dropouts": bool(dropouts),
        "EddyModel": {"phase_encoding_axis": EDDY_PE_AXIS, "coefficient_range": EDDY_COEFF_RANGE,
                      "shift_mm_max": EDDY_SHIFT_MM_MAX, "per": "unit gradient component at b=1000"},
        "DropoutModel": {"per_run": DROPOUTS_PER_RUN, "signal_fraction": DROPOUT_SIGNAL,
                         "slice_axis": DROPOUT_SLICE_AXIS},
        "Template": "MNI152NLin2009aSym: ICBM 2009a nonlinear symmetric T1, GM and WM maps packaged with "
                    "nilearn; brain mask = T1 > 0.2",
        "Subjects": {f"sub-{s.label}": {"diagnosis": s.diagnosis, "fa_scale": s.fa_scale,
                                        "md_scale": s.md_scale, "size_scale": s.size_scale,
                                        "directions_per_shell": s.directions, "runs": summaries[s.label]}
                     for s in subjects},
    })


# --- command line --------------------------------------------------------------

def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="where the BIDS dataset goes (must not exist, or be empty)")
    parser.add_argument("--profile", default="demo", choices=SIMULATOR_PROFILES,
                        help="demo: template anatomy, one strong effect (default); realistic: per-subject "
                             "warps, age/sex/site, weak heterogeneous effect (docs/simulation.md)")
    parser.add_argument("--subjects", type=int, default=20, metavar="N",
                        help="number of subjects, half ADHD half TD (default 20)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument("--size", default="demo", choices=list(SIZES),
                        help="demo: 2.5 mm, 3 b0 + 30 directions; hbn: 1.8 mm, b=1000/2000 x 64 + 5 b0")
    parser.add_argument("--effect", type=float, default=0.08, metavar="F",
                        help=f"fractional FA reduction in the {EFFECT_REGION} region for ADHD (default 0.08)")
    parser.add_argument("--snr", type=float, default=25.0, metavar="X",
                        help="b0 SNR in white matter (default 25; 0 or inf: no noise)")
    parser.add_argument("--sessions", type=int, default=1, metavar="K", help="sessions per subject (default 1)")
    parser.add_argument("--directions", type=int, default=None, metavar="N",
                        help="directions per shell instead of the size's default")
    parser.add_argument("--no-motion", dest="motion", action="store_false",
                        help="no per-volume head motion (the head pose stays)")
    parser.add_argument("--motion-confound", dest="motion_confound", type=float, default=0.0, metavar="F",
                        help="ADHD subjects move (1 + F) times as much (a motion-diagnosis confound; default 0)")
    parser.add_argument("--no-eddy", dest="eddy", action="store_false",
                        help="no eddy-current distortion of the DW volumes")
    parser.add_argument("--no-dropouts", dest="dropouts", action="store_false",
                        help="no slice dropouts")
    parser.add_argument("--nprocs", type=int, default=min(2, os.cpu_count() or 1), metavar="N",
                        help="subjects simulated at once (threads; default: 2 or the CPU count if lower); "
                             "the files do not depend on it")


def run(settings: SimulateSettings) -> Path:
    """The demo profile's dataset described by ``settings`` (built by ``simulate_cli``)."""
    s = settings
    return simulate_dataset(s.out_dir, n_subjects=s.subjects, seed=s.seed, size=s.size, effect=s.effect,
                            snr=s.snr, sessions=s.sessions, directions=s.directions, motion=s.motion,
                            eddy=s.eddy, dropouts=s.dropouts, n_jobs=s.nprocs, motion_confound=s.motion_confound)

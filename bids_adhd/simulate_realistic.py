"""The ``realistic`` simulator profile: a known-truth benchmark that is not trivially separable.

``simulate_realistic(out_dir, ...)`` (``bids_adhd simulate OUT --profile realistic``)
reuses the demo phantom of ``simulate.py`` (tissue model, signal, noise, motion,
file writing) and adds, per subject:

* **anatomy that differs non-linearly from the template**: a smooth random
  displacement field ``u`` (``Warp``), ``x_template = h + u(h)`` for a point
  ``h`` of the subject's head frame, on top of the rigid pose; brain size varies
  with age and sex (``size_scale``);
* **age and sex trends** of FA and MD (``fa_scale``/``md_scale``);
* **sites** (``SITES``): voxel size, b-value, SNR and intensity scale per site;
* **a diagnosis-related confound**: ADHD subjects move more (``motion_ratio``);
* **a weak, distributed, heterogeneous ADHD effect**: ``REGIONS`` (MNI boxes
  within white matter, tracts reported in DTI studies of ADHD); every subject
  has a natural per-region FA factor ~ N(1, ``REGION_FA_SD``); each ADHD
  subject carries each regional effect with probability ``carrier_fraction``,
  and a carrier's regional FA is lowered by ``effect_d * REGION_FA_SD``
  (``effect_d`` is a Cohen's d in units of the natural between-subject SD).

The truth files are those of the demo profile (same names) plus the warp; the
oracle (``oracle_scores``) is defined in ``docs/simulation.md``. Every
parameter and its source is listed there.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__
from . import derivatives as _d
from . import simulate as sim
from .errors import UsageError
from .settings import SimulateSettings

LOG = logging.getLogger("bids_adhd.simulate")

PROFILE = "realistic"

# --- parameters (sources in docs/simulation.md) --------------------------------

AGE_RANGE = (6.0, 17.0)
AGE_CENTRE = 11.5
MALE_FRACTION = {"ADHD": 0.75, "TD": 0.5}     # ADHD samples are mostly boys
FA_AGE_SLOPE = 0.006          # FA x (1 + slope (age - 11.5)): ~ +0.6 % per year in childhood
MD_AGE_SLOPE = -0.008         # MD falls ~ 0.8 % per year
FA_MALE = 0.005               # boys' FA +0.5 %
FA_SUBJECT_SD = 0.03          # remaining global FA/MD variation between subjects
BRAIN_VOLUME_AGE_SLOPE = 0.01  # brain volume +1 % per year of age (relative to age 11.5)
BRAIN_VOLUME_MALE = 0.09       # boys' brains ~9 % larger
BRAIN_VOLUME_SD = 0.08         # individual variation of brain volume
WARP_RMS_MM = 2.5             # RMS length of the non-linear displacement inside the brain
WARP_SMOOTH_MM = 12.0         # Gaussian smoothing of the random field (sigma)
WARP_SPACING_MM = 4.0         # control grid of the displacement field (trilinear between nodes)
WARP_BOX_MM = ((-110.0, 110.0), (-150.0, 110.0), (-100.0, 120.0))
REGION_FA_SD = 0.04           # natural between-subject SD of a region's FA (multiplicative)
MOTION_LEVEL_SD = 0.5         # per-subject motion level ~ lognormal(0, 0.5)
MOTION_BASE = {"volumes": 3.0, "rot_deg": 1.0, "shift_mm": 1.0}
MOTION_CAP = {"rot_deg": 4.0, "shift_mm": 4.0}

DEFAULT_EFFECT_D = 1.0          # oracle AUC ~0.75 at N = 100 (tuning seed 7; docs/simulation.md)
DEFAULT_CARRIER_FRACTION = 0.5
DEFAULT_MOTION_RATIO = 1.5

#: candidate effect regions: MNI boxes (mm) intersected with WM probability > 0.5
REGIONS = {
    "cc-genu": ((-15.0, 15.0), (15.0, 35.0), (-5.0, 25.0)),
    "cc-splenium": ((-15.0, 15.0), (-45.0, -25.0), (0.0, 25.0)),
    "slf-right": ((28.0, 45.0), (-45.0, 10.0), (15.0, 40.0)),
    "ic-left": ((-28.0, -12.0), (-15.0, 15.0), (-5.0, 15.0)),
    "ic-right": ((12.0, 28.0), (-15.0, 15.0), (-5.0, 15.0)),
    "cerebellum-wm": ((-25.0, 25.0), (-65.0, -40.0), (-40.0, -20.0)),
}


@dataclass(frozen=True)
class Site:
    name: str
    voxel_mm: float
    shape: tuple
    bval: int
    directions: int
    snr: float
    intensity: float

    def protocol(self) -> sim.Protocol:
        return sim.Protocol(f"{PROFILE}-{self.name}", self.voxel_mm, self.shape, ((self.bval, self.directions),), 3,
                            echo_time=0.089, repetition_time=3.2, total_readout_time=0.05)


SITES = {
    "SiteA": Site("SiteA", 2.5, (64, 76, 64), 1000, 30, 25.0, 1.0),
    "SiteB": Site("SiteB", 2.2, (72, 86, 72), 800, 30, 20.0, 0.8),
    "SiteC": Site("SiteC", 3.0, (54, 64, 54), 1200, 30, 30.0, 1.3),
}

# random streams, distinct from the demo profile's (simulate.py uses 0-4)
_PARTICIPANTS, _ANATOMY, _WARP, _EFFECT, _POSE = range(100, 105)


# --- the warp ------------------------------------------------------------------

@dataclass(frozen=True)
class Warp:
    """``x_template = h + u(h)``; ``u`` trilinear between the nodes of a regular grid (mm)."""

    field: np.ndarray          # (3, nx, ny, nz) displacement in mm
    origin: np.ndarray         # mm of node (0, 0, 0)
    spacing: float

    def displacement(self, pts: np.ndarray) -> np.ndarray:
        vox = (np.asarray(pts, np.float64) - self.origin) / self.spacing
        return sim._trilinear(self.field, vox).astype(np.float64)

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        return np.asarray(pts, np.float64) + self.displacement(pts)

    def inverse(self, pts: np.ndarray, iters: int = 30) -> np.ndarray:
        """``h`` with ``h + u(h) = pts`` (fixed-point iteration; ``|grad u| < 1``)."""
        pts = np.asarray(pts, np.float64)
        h = pts.copy()
        for _ in range(iters):
            h = pts - self.displacement(h)
        return h

    def affine(self) -> np.ndarray:
        """Voxel -> mm affine of the node grid."""
        return np.diag([self.spacing] * 3 + [1.0]) + np.pad(self.origin, (0, 1))[:, None] * [0, 0, 0, 1]


def _brain_box_mm() -> tuple[np.ndarray, np.ndarray]:
    raw = sim._raw_template()
    idx = np.argwhere(raw["brain"] > 0.5)
    return sim._apply(raw["affine"], idx.min(0)[None].astype(float))[0], \
        sim._apply(raw["affine"], idx.max(0)[None].astype(float))[0]


def random_warp(rng: np.random.Generator, rms_mm: float = WARP_RMS_MM) -> Warp:
    """A smooth random displacement field with RMS length ``rms_mm`` inside the MNI brain box."""
    from scipy.ndimage import gaussian_filter

    origin = np.array([lo for lo, _ in WARP_BOX_MM])
    shape = tuple(int(round((hi - lo) / WARP_SPACING_MM)) + 1 for lo, hi in WARP_BOX_MM)
    noise = rng.standard_normal((3,) + shape)
    field = np.stack([gaussian_filter(c, WARP_SMOOTH_MM / WARP_SPACING_MM, mode="constant") for c in noise])
    lo, hi = _brain_box_mm()
    idx = [slice(int((a - o) / WARP_SPACING_MM), int((b - o) / WARP_SPACING_MM) + 1)
           for a, b, o in zip(lo, hi, origin)]
    inner = field[(slice(None),) + tuple(idx)]
    rms = math.sqrt(float((inner ** 2).sum(axis=0).mean()))
    field *= rms_mm / rms if rms > 0 else 0.0
    return Warp(field.astype(np.float32), origin, WARP_SPACING_MM)


# --- regions and the effect ----------------------------------------------------

def region_labels() -> tuple[np.ndarray, np.ndarray]:
    """(labels, affine) on the cropped 1 mm template grid: 0 outside, k+1 in ``REGIONS``' k-th region."""
    raw = sim._raw_template()
    wm, aff = raw["wm"], raw["affine"]
    labels = np.zeros(wm.shape, np.int8)
    for k, box in enumerate(REGIONS.values()):
        inside = wm > sim.EFFECT_WM_THRESHOLD
        for axis, (lo, hi) in enumerate(box):
            coord = aff[axis, axis] * np.arange(wm.shape[axis]) + aff[axis, 3]
            inside &= ((coord >= lo) & (coord <= hi)).reshape([-1 if a == axis else 1 for a in range(3)])
        labels[inside & (labels == 0)] = k + 1
    return labels, aff


class RegionalEffect:
    """``fa_effect`` hook: FA factor per template point = the subject's factor of the region it is in."""

    def __init__(self, labels: np.ndarray, affine: np.ndarray, factors: np.ndarray):
        self.labels, self.inv = labels, np.linalg.inv(affine)
        self.factors = np.concatenate([[1.0], np.asarray(factors, np.float64)])

    def __call__(self, p: np.ndarray):
        v = np.rint(sim._apply(self.inv, p)).astype(np.intp)
        ok = np.all((v >= 0) & (v < np.array(self.labels.shape)), axis=1)
        lab = np.zeros(len(p), np.intp)
        lab[ok] = self.labels[v[ok, 0], v[ok, 1], v[ok, 2]]
        return self.factors[lab], lab > 0


# --- subjects ------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    """The realistic profile's knobs (the CLI's ``--effect-d`` etc.)."""

    effect_d: float = DEFAULT_EFFECT_D
    carrier_fraction: float = DEFAULT_CARRIER_FRACTION
    motion_ratio: float = DEFAULT_MOTION_RATIO


def participants(n: int, seed: int) -> list[sim.Subject]:
    """Labels, diagnosis (balanced, shuffled), age, sex (diagnosis-dependent), site."""
    rng = np.random.default_rng([seed, _PARTICIPANTS, n])
    diag = np.array([sim.DIAGNOSES[0]] * (n // 2) + [sim.DIAGNOSES[1]] * (n - n // 2))[rng.permutation(n)]
    ages = np.round(rng.uniform(*AGE_RANGE, n), 1)
    u = rng.uniform(size=n)
    sites = rng.choice(list(SITES), size=n)
    width = max(2, len(str(n)))
    return [sim.Subject(label=f"{i + 1:0{width}d}", index=i, diagnosis=str(diag[i]), age=float(ages[i]),
                        sex="M" if u[i] < MALE_FRACTION[str(diag[i])] else "F", site=str(sites[i]))
            for i in range(n)]


def set_anatomy(s: sim.Subject, seed: int, opts: Options, labels, labels_affine) -> dict:
    """Fill the subject's anatomy, trends, warp and regional FA factors; return what was drawn."""
    a = np.random.default_rng([seed, _ANATOMY, s.index])
    male = s.sex == "M"
    s.fa_scale = float((1 + FA_AGE_SLOPE * (s.age - AGE_CENTRE) + FA_MALE * male)
                       * (1 + np.clip(a.normal(0, FA_SUBJECT_SD), -0.08, 0.08)))
    s.md_scale = float((1 + MD_AGE_SLOPE * (s.age - AGE_CENTRE))
                       * (1 + np.clip(a.normal(0, FA_SUBJECT_SD), -0.08, 0.08)))
    volume = (1 + BRAIN_VOLUME_AGE_SLOPE * (s.age - AGE_CENTRE) + BRAIN_VOLUME_MALE * (male - 0.5)) \
        * (1 + np.clip(a.normal(0, BRAIN_VOLUME_SD), -0.2, 0.2))
    s.size_scale = float(volume ** (1 / 3))
    k = sim.FA_FIELD_WAVES
    dirs = a.normal(size=(k, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    s.fa_waves = dirs * (2 * np.pi / a.uniform(*sim.FA_FIELD_WAVELENGTH_MM, size=k))[:, None]
    s.fa_phases = a.uniform(0, 2 * np.pi, k)
    s.fa_amplitudes = a.normal(0, sim.FA_FIELD_SD * math.sqrt(2.0 / k), k)
    s.warp = random_warp(np.random.default_rng([seed, _WARP, s.index]))
    e = np.random.default_rng([seed, _EFFECT, s.index])
    natural = 1 + np.clip(e.normal(0, REGION_FA_SD, len(REGIONS)), -3 * REGION_FA_SD, 3 * REGION_FA_SD)
    draw = e.uniform(size=len(REGIONS))                # drawn for everyone: TD subjects stay the same
    carries = (draw < opts.carrier_fraction) & (s.diagnosis == sim.DIAGNOSES[0])
    factors = natural * np.where(carries, 1 - opts.effect_d * REGION_FA_SD, 1.0)
    s.fa_effect = RegionalEffect(labels, labels_affine, factors)
    site = SITES[s.site]
    s.directions = site.directions
    s.s0_scale = site.intensity
    return {"natural_region_fa_factor": dict(zip(REGIONS, natural.tolist())),
            "carried_regions": [r for r, c in zip(REGIONS, carries) if c],
            "region_fa_factor": dict(zip(REGIONS, factors.tolist()))}


def motion_run(s: sim.Subject, seed: int, opts: Options, n_volumes: int) -> tuple[sim.Run, float]:
    """Head pose (as the demo) and per-volume motion whose level is higher in ADHD (``motion_ratio``)."""
    rng = np.random.default_rng([seed, _POSE, s.index])
    rot = rng.uniform(-sim.POSE_MAX_ROT_DEG, sim.POSE_MAX_ROT_DEG, 3)
    trans = rng.uniform(-sim.POSE_MAX_SHIFT_MM, sim.POSE_MAX_SHIFT_MM, 3)
    level = float(rng.lognormal(0.0, MOTION_LEVEL_SD)) * (opts.motion_ratio if s.diagnosis == "ADHD" else 1.0)
    n_moved = int(np.clip(round(MOTION_BASE["volumes"] * level), 1, n_volumes // 3))
    which = np.sort(rng.choice(np.arange(1, n_volumes), size=n_moved, replace=False))
    r_max = min(MOTION_BASE["rot_deg"] * level, MOTION_CAP["rot_deg"])
    t_max = min(MOTION_BASE["shift_mm"] * level, MOTION_CAP["shift_mm"])
    moved = {int(v): (np.radians(rng.uniform(-r_max, r_max, 3)), rng.uniform(-t_max, t_max, 3)) for v in which}
    return sim.Run(session=None, rotation_deg=rot, translation_mm=trans, moved=moved), level


def native_grid(s: sim.Subject, run: sim.Run) -> tuple[sim.Protocol, np.ndarray, np.ndarray]:
    """(protocol, DWI affine, scanner->template-head matrix P^-1) as ``simulate._simulate_run`` builds them."""
    protocol = SITES[s.site].protocol()
    P = sim.pose_matrix(s, run)
    centre = sim._apply(P, np.array([sim.BRAIN_CENTRE_MNI]))[0]
    return protocol, sim.grid_affine(protocol.shape, protocol.voxel_mm, centre), np.linalg.inv(P)


def truth_maps(s: sim.Subject, run: sim.Run) -> dict:
    """The noise-free native-space truth of the reference volume (FA, WM fraction, effect mask), in memory:
    what ``_simulate_run`` writes to derivatives/truth/ (used to choose the default effect size quickly)."""
    protocol, affine, P_inv = native_grid(s, run)
    ref = sim._phantom_on_grid(protocol.shape, P_inv @ affine, s, 0.0, sim._template(protocol.voxel_mm))
    shape = tuple(protocol.shape)
    ref["wm_fraction"] = ref["wm"] * ref["brain"]
    return {"fa": sim._full(ref, "fa", shape), "wm": sim._full(ref, "wm_fraction", shape),
            "effect": sim._full(ref, "effect", shape, np.uint8), "affine": affine}


def oracle_score(fa: np.ndarray, wm: np.ndarray, effect: np.ndarray) -> float:
    """The oracle (docs/simulation.md): mean truth FA in the effect mask over mean truth FA in the rest of
    the white matter (WM probability > 0.5 outside the mask)."""
    inside = effect > 0
    rest = (wm > 0.5) & ~inside
    return float(fa[inside].mean() / fa[rest].mean())


def oracle_scores(root: Path) -> dict:
    """{participant_id: oracle score} from a realistic dataset's derivatives/truth/."""
    import nibabel as nib

    out = {}
    for sub in sorted(p.name for p in (Path(root) / "derivatives" / "truth").glob("sub-*")):
        d = Path(root) / "derivatives" / "truth" / sub / "dwi"
        load = (lambda name: np.asarray(nib.load(str(d / f"{sub}_{name}.nii.gz")).dataobj))
        out[sub] = oracle_score(load("model-tensor_param-fa_dwimap"), load("label-WM_probseg"),
                                load("desc-effect_mask"))
    return out


# --- the dataset ---------------------------------------------------------------

def _check(n_subjects, seed, opts: Options, n_jobs) -> None:
    sim._check_args(n_subjects, seed, "demo", 0.0, 25.0, 1, None, n_jobs)
    if not (math.isfinite(opts.effect_d) and 0 <= opts.effect_d <= 1 / REGION_FA_SD - 1):
        raise UsageError(f"--effect-d must be in [0, {1 / REGION_FA_SD - 1:g}] (got {opts.effect_d})")
    if not 0 <= opts.carrier_fraction <= 1:
        raise UsageError(f"--carrier-fraction must be in [0, 1] (got {opts.carrier_fraction})")
    if not (math.isfinite(opts.motion_ratio) and opts.motion_ratio > 0):
        raise UsageError(f"--motion-ratio must be a positive number (got {opts.motion_ratio})")


def simulate_realistic(out_dir, n_subjects: int = 20, seed: int = 0, opts: Options = Options(),
                       *, n_jobs: int = 1) -> Path:
    """Write a realistic-profile BIDS dataset to ``out_dir`` (same rules as ``simulate_dataset``)."""
    from threadpoolctl import threadpool_limits

    _check(n_subjects, seed, opts, n_jobs)
    out_dir = Path(out_dir).absolute()
    sim._check_out_dir(out_dir)
    n_subjects, seed = int(n_subjects), int(seed)
    t0 = time.perf_counter()
    LOG.info("simulating %d realistic subjects (seed %d, %s) into %s", n_subjects, seed, opts, out_dir)
    subjects = participants(n_subjects, seed)
    labels, labels_aff = region_labels()
    with sim._staging_dir(out_dir) as root, threadpool_limits(1):
        truth = root / "derivatives" / "truth"
        _write_dataset_files(root, truth, subjects, seed, opts, labels, labels_aff)
        for site in SITES.values():          # the shared, cached pieces first (threads only read them)
            sim._template(site.voxel_mm)
            sim.b_table(site.protocol(), site.directions)

        def one(s: sim.Subject) -> dict:
            drawn = set_anatomy(s, seed, opts, labels, labels_aff)
            protocol = SITES[s.site].protocol()
            run, level = motion_run(s, seed, opts, len(sim.b_table(protocol, s.directions)[0]))
            snr = SITES[s.site].snr / s.s0_scale          # sigma = intensity * S0_WM / site SNR
            summary = sim._simulate_run(root, truth, s, run, 0, protocol, 0.0, snr, seed, True)
            _write_warp(truth, s)
            return {**summary, **drawn, "motion_level": level}

        workers = max(1, min(int(n_jobs), len(subjects)))
        if workers == 1:
            results = [one(s) for s in sim._progress(subjects, len(subjects))]
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="simulate") as pool:
                results = list(sim._progress(pool.map(one, subjects), len(subjects)))
        _write_truth_json(truth, subjects, results, seed, opts, labels)
    LOG.info("wrote %s in %.1f s", out_dir, time.perf_counter() - t0)
    return out_dir


def _write_warp(truth: Path, s: sim.Subject) -> None:
    d = truth / f"sub-{s.label}" / "dwi"
    w = s.warp
    _d.write_nifti(d / f"sub-{s.label}_desc-warp_xfm.nii.gz", sim._nifti(np.moveaxis(w.field, 0, -1), w.affine()))
    _d.write_json(d / f"sub-{s.label}_desc-warp_xfm.json", {
        "Description": "Non-linear part of the subject's anatomy: a point h of the subject's head frame "
                       "(template mm before the pose, see desc-pose_xfm.json: h = ScannerToTemplate @ x_scanner) "
                       "is the template point x_template = h + u(h); u (mm, 3 components on the last axis) is "
                       "interpolated trilinearly between the nodes of this image (0 outside). The scanner "
                       "point of template point m is TemplateToScanner @ h with h solving h + u(h) = m.",
        "FromSpace": "head", "ToSpace": sim.TEMPLATE_SPACE, "Interpolation": "trilinear",
        "RmsMm": WARP_RMS_MM, "SmoothingSigmaMm": WARP_SMOOTH_MM})


def _write_dataset_files(root, truth, subjects, seed, opts: Options, labels, labels_aff) -> None:
    generated = [{"Name": "bids_adhd", "Version": __version__,
                  "Description": f"bids_adhd simulate --profile {PROFILE} --seed {seed} --effect-d "
                                 f"{opts.effect_d:g} --carrier-fraction {opts.carrier_fraction:g} "
                                 f"--motion-ratio {opts.motion_ratio:g}"}]
    _d.write_json(root / "dataset_description.json", {
        "Name": "bids_adhd simulated paediatric diffusion MRI (ADHD vs TD), realistic profile",
        "BIDSVersion": "1.10.0", "DatasetType": "raw", "License": "CC0",
        "Authors": ["bids_adhd simulator"], "GeneratedBy": generated})
    _d.write_text(root / "README", (
        "Simulated diffusion MRI dataset written by `bids_adhd simulate --profile realistic`: the demo phantom "
        "with per-subject non-linear anatomy, age/sex trends, three sites and a weak, heterogeneous ADHD effect "
        f"over {len(REGIONS)} white-matter regions. Ground truth in derivatives/truth/; see docs/simulation.md "
        "in the bids_adhd repository.\n"))
    _d.write_tsv(root / "participants.tsv", {
        "participant_id": [f"sub-{s.label}" for s in subjects], "diagnosis": [s.diagnosis for s in subjects],
        "age": [s.age for s in subjects], "sex": [s.sex for s in subjects],
        "site": [s.site for s in subjects]}, float_fmt="{:.1f}")
    _d.write_json(root / "participants.json", {
        "participant_id": {"Description": "Unique participant identifier"},
        "diagnosis": {"Description": "Simulated diagnostic group",
                      "Levels": {"ADHD": "attention-deficit/hyperactivity disorder", "TD": "typically developing"}},
        "age": {"Description": "Age at scan (affects brain size, FA and MD)", "Units": "year"},
        "sex": {"Description": "Sex (affects brain size and FA)", "Levels": {"M": "male", "F": "female"}},
        "site": {"Description": "Acquisition site (voxel size, b-value, SNR, intensity scale)",
                 "Levels": {k: f"{v.voxel_mm} mm, b={v.bval}, SNR {v.snr:g}" for k, v in SITES.items()}}})
    _d.write_json(truth / "dataset_description.json", {
        "Name": "bids_adhd simulation ground truth", "BIDSVersion": "1.10.0",
        "DatasetType": "derivative", "GeneratedBy": generated})
    _d.write_text(truth / "README", (
        "Ground truth of the simulated dataset two folders up (realistic profile): per subject, in native DWI "
        "space at the reference volume 0, the true tensor maps, masks, tissue fractions, the effect regions "
        "(desc-effect_mask, for every subject), the head pose, the motion and the non-linear warp "
        "(desc-warp_xfm). truth.json summarises the parameters.\n"))
    raw = sim._raw_template()
    full = np.zeros(raw["full_shape"], np.uint8)
    sl = tuple(slice(a, a + n) for a, n in zip(raw["crop_lo"], labels.shape))
    full[sl] = labels > 0
    _d.write_nifti(truth / f"space-{sim.TEMPLATE_SPACE}_desc-effect_mask.nii.gz", sim._nifti(full, raw["full_affine"]))


def _write_truth_json(truth, subjects, results, seed, opts: Options, labels) -> None:
    _d.write_json(truth / "truth.json", {
        "Profile": PROFILE, "Seed": seed,
        "EffectD": opts.effect_d, "CarrierFraction": opts.carrier_fraction, "MotionRatio": opts.motion_ratio,
        "RegionFaSd": REGION_FA_SD, "CarrierFaFactor": 1 - opts.effect_d * REGION_FA_SD,
        "Regions": {name: {"box_mm": box, "wm_probability_above": sim.EFFECT_WM_THRESHOLD,
                           "voxels_1mm": int((labels == k + 1).sum())}
                    for k, (name, box) in enumerate(REGIONS.items())},
        "EffectModel": "every subject: FA x natural factor ~ N(1, RegionFaSd) per region; ADHD carriers "
                       "(probability CarrierFraction per region): FA x (1 - EffectD * RegionFaSd) in that region",
        "Oracle": "mean truth FA in desc-effect_mask / mean truth FA where WM probseg > 0.5 outside the mask",
        "Sites": {k: {"voxel_mm": v.voxel_mm, "shape": v.shape, "bval": v.bval, "directions": v.directions,
                      "snr": v.snr, "intensity": v.intensity} for k, v in SITES.items()},
        "Trends": {"fa_age_slope": FA_AGE_SLOPE, "md_age_slope": MD_AGE_SLOPE, "fa_male": FA_MALE,
                   "brain_volume_age_slope": BRAIN_VOLUME_AGE_SLOPE, "brain_volume_male": BRAIN_VOLUME_MALE,
                   "brain_volume_sd": BRAIN_VOLUME_SD, "fa_md_subject_sd": FA_SUBJECT_SD,
                   "age_centre": AGE_CENTRE},
        "Warp": {"rms_mm": WARP_RMS_MM, "smoothing_sigma_mm": WARP_SMOOTH_MM, "node_spacing_mm": WARP_SPACING_MM},
        "Motion": {"level": f"lognormal(0, {MOTION_LEVEL_SD}) x MotionRatio for ADHD", **MOTION_BASE,
                   "caps": MOTION_CAP},
        "Template": sim.TEMPLATE_SPACE,
        "Subjects": {f"sub-{s.label}": {"diagnosis": s.diagnosis, "age": s.age, "sex": s.sex, "site": s.site,
                                        "fa_scale": s.fa_scale, "md_scale": s.md_scale,
                                        "size_scale": s.size_scale, **r}
                     for s, r in zip(subjects, results)},
    })


# --- command line --------------------------------------------------------------

def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("realistic profile (--profile realistic)")
    g.add_argument("--effect-d", dest="effect_d", type=float, default=DEFAULT_EFFECT_D, metavar="D",
                   help=f"carriers' regional FA shift in units of the between-subject SD (default {DEFAULT_EFFECT_D})")
    g.add_argument("--carrier-fraction", dest="carrier_fraction", type=float, default=DEFAULT_CARRIER_FRACTION,
                   metavar="Q", help="probability that an ADHD subject carries each regional effect "
                                     f"(default {DEFAULT_CARRIER_FRACTION})")
    g.add_argument("--motion-ratio", dest="motion_ratio", type=float, default=DEFAULT_MOTION_RATIO, metavar="R",
                   help=f"ADHD subjects' motion level relative to TD (default {DEFAULT_MOTION_RATIO}; 1: no confound)")


def run(settings: SimulateSettings) -> Path:
    """The realistic profile's dataset described by ``settings`` (built by ``simulate_cli``)."""
    s = settings
    opts = Options(DEFAULT_EFFECT_D if s.effect_d is None else s.effect_d,
                   DEFAULT_CARRIER_FRACTION if s.carrier_fraction is None else s.carrier_fraction,
                   DEFAULT_MOTION_RATIO if s.motion_ratio is None else s.motion_ratio)
    return simulate_realistic(s.out_dir, n_subjects=s.subjects, seed=s.seed, opts=opts, n_jobs=s.nprocs)

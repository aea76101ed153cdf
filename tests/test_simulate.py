"""The simulated BIDS dataset: validity, layout, exact truth, the planted effect,
the motion convention, determinism, the command line and atomic output."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_adhd import simulate as sim
from bids_adhd.cli import main
from conftest import TINY_BIDS_ARGS

VALIDATOR = Path(sys.executable).parent / "bids-validator-deno"


# --- helpers -------------------------------------------------------------------

def validate(root: Path, recursive: bool = False) -> dict:
    """Run bids-validator-deno; fail (never skip) if it cannot run; return its JSON report."""
    assert VALIDATOR.is_file(), f"{VALIDATOR} not found: install the 'test' extra (bids-validator-deno)"
    cmd = [str(VALIDATOR), str(root), "--format", "json"] + (["--recursive"] if recursive else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip(), f"validator printed nothing (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout)


def errors_of(report: dict) -> list:
    return [(i["code"], i.get("location")) for i in report["issues"]["issues"] if i["severity"] == "error"]


def participants(root: Path) -> list[dict]:
    with open(root / "participants.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def truth_dir(root: Path, sub: str, ses: str | None = None) -> Path:
    d = root / "derivatives" / "truth" / f"sub-{sub}"
    return (d / f"ses-{ses}" if ses else d) / "dwi"


def truth(root: Path, sub: str, name: str, ses: str | None = None) -> np.ndarray:
    prefix = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    return load(truth_dir(root, sub, ses) / f"{prefix}_{name}.nii.gz")


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def fit_tensor(data, bvals, bvecs, mask, volumes=None):
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    volumes = np.arange(len(bvals)) if volumes is None else np.asarray(volumes)
    gtab = gradient_table(bvals[volumes], bvecs=bvecs[volumes])
    return TensorModel(gtab, fit_method="OLS").fit(data[..., volumes], mask=mask)


def read_dwi(root: Path, sub: str):
    stem = root / f"sub-{sub}" / "dwi" / f"sub-{sub}_dwi"
    img = nib.load(f"{stem}.nii.gz")
    return img, np.loadtxt(f"{stem}.bval"), np.loadtxt(f"{stem}.bvec").T


# --- noise-free datasets: the exact truth and the planted effect ----------------

CLEAN = dict(n_subjects=2, seed=2, size="demo", directions=12)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Noise free, effect 0.2, with exaggerated motion (8°, 4 mm) so that the motion
    convention test can tell a rotated gradient from an unrotated one; no eddy currents and
    no dropouts (the fits here are exact; their truth is tested on tiny_bids)."""
    tmp = tmp_path_factory.mktemp("clean")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sim, "MOTION_MAX_ROT_DEG", 8.0)
        mp.setattr(sim, "MOTION_MAX_SHIFT_MM", 4.0)
        return sim.simulate_dataset(tmp / "effect", snr=np.inf, effect=0.2, n_jobs=2, eddy=False, dropouts=False,
                                    **CLEAN)


@pytest.fixture(scope="module")
def clean0(tmp_path_factory):
    """The same subjects (anatomy and pose do not depend on the b-table), noise free
    (snr=0), no effect, no motion, no eddy currents or dropouts, fewer directions."""
    tmp = tmp_path_factory.mktemp("clean0")
    return sim.simulate_dataset(tmp / "none", snr=0, effect=0.0, motion=False, eddy=False, dropouts=False,
                                n_jobs=2, **{**CLEAN, "directions": 6})


def test_noise_free_fit_recovers_truth_exactly(clean, clean0):
    for root in (clean, clean0):
        for sub in ("01", "02"):
            img, bvals, bvecs = read_dwi(root, sub)
            assert img.get_data_dtype() == np.float32                  # noise free: stored exactly
            motion = json.loads((truth_dir(root, sub) / f"sub-{sub}_desc-motion_timeseries.json").read_text())
            still = [v for v in range(len(bvals)) if v not in motion["MovedVolumes"]]
            mask = truth(root, sub, "desc-brain_mask") > 0
            fit = fit_tensor(img.get_fdata(dtype=np.float32), bvals, bvecs, mask, still)
            for param, scale in (("fa", 1.0), ("md", 1e-3), ("ad", 1e-3), ("rd", 1e-3)):
                true = truth(root, sub, f"model-tensor_param-{param}_dwimap")
                err = np.abs(getattr(fit, param) - true)[mask].max() / scale
                assert err < 1e-4, (root.name, sub, param, err)


def test_tissue_values(clean0):
    for sub in ("01", "02"):
        fa = truth(clean0, sub, "model-tensor_param-fa_dwimap")
        md = truth(clean0, sub, "model-tensor_param-md_dwimap")
        wm, gm, csf = (truth(clean0, sub, f"label-{t}_probseg") for t in ("WM", "GM", "CSF"))
        assert np.allclose((wm + gm + csf)[wm + gm + csf > 0].max(), 1.0, atol=1e-3)
        core = wm > 0.9
        assert core.sum() > 5000
        assert 0.4 <= np.percentile(fa[core], 1) and np.percentile(fa[core], 99) <= 0.8
        assert 0.6e-3 <= np.median(md[core]) <= 0.8e-3
        cortex = gm > 0.8
        assert 0.1 <= np.median(fa[cortex]) <= 0.2
        assert np.median(md[cortex]) < 1.2e-3
        fluid = csf > 0.8
        assert fluid.sum() > 100
        assert np.median(fa[fluid]) < 0.05
        assert 2.5e-3 <= np.median(md[fluid]) <= 3.1e-3
        assert md.max() <= 3.0e-3 * 1.05 + 1e-9                     # CSF MD (x global MD jitter) is the max
        assert fa.max() < 0.95 and fa.min() >= 0


def test_effect_is_planted_exactly(clean, clean0):
    diag = {r["participant_id"][4:]: r["diagnosis"] for r in participants(clean)}
    assert sorted(diag.values()) == ["ADHD", "TD"]
    assert diag == {r["participant_id"][4:]: r["diagnosis"] for r in participants(clean0)}
    for sub, group in diag.items():
        region = truth(clean, sub, "desc-effect_mask") > 0
        np.testing.assert_array_equal(region, truth(clean0, sub, "desc-effect_mask") > 0)
        wm = truth(clean, sub, "label-WM_probseg")
        assert 0.05 <= region.sum() / (wm > 0.5).sum() <= 0.15       # ~5-15 % of the WM
        assert np.all(wm[region] > 0.2)
        fa1 = truth(clean, sub, "model-tensor_param-fa_dwimap").astype(np.float64)
        fa0 = truth(clean0, sub, "model-tensor_param-fa_dwimap").astype(np.float64)
        md1 = truth(clean, sub, "model-tensor_param-md_dwimap")
        md0 = truth(clean0, sub, "model-tensor_param-md_dwimap")
        np.testing.assert_array_equal(fa1[~region], fa0[~region])     # nothing else changes
        np.testing.assert_array_equal(md1, md0)                       # MD kept
        if group == "ADHD":
            np.testing.assert_allclose(fa1[region], 0.8 * fa0[region], rtol=1e-6)
            assert fa1[region].mean() / fa0[region].mean() == pytest.approx(0.8, rel=1e-6)
        else:
            np.testing.assert_array_equal(fa1, fa0)


def test_template_space_truth(clean):
    t = clean / "derivatives" / "truth"
    summary = json.loads((t / "truth.json").read_text())
    assert summary["EffectRegion"] == sim.EFFECT_REGION and summary["EffectFraction"] == 0.2
    assert summary["NoiseModel"] == "none" and summary["SNR"] is None
    assert {k: v["diagnosis"] for k, v in summary["Subjects"].items()} == \
        {r["participant_id"]: r["diagnosis"] for r in participants(clean)}
    img = nib.load(str(t / f"space-{sim.TEMPLATE_SPACE}_desc-effect_mask.nii.gz"))
    assert img.shape == (197, 233, 189) and np.allclose(img.header.get_zooms(), 1.0)
    mask = np.asarray(img.dataobj) > 0
    size = summary["EffectRegionSize"]
    assert mask.sum() == size["voxels_1mm"] and 0.05 <= size["fraction_of_wm"] <= 0.15
    # the region lies inside its MNI box
    ijk = np.argwhere(mask)
    xyz = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    for axis, key in enumerate("xyz"):
        lo, hi = sim.EFFECT_BOX_MM[key]
        assert lo <= xyz[:, axis].min() and xyz[:, axis].max() <= hi


def test_motion_convention(clean):
    """Undo volume v's motion as documented (sample it at M_v x) and predict its signal from
    the tensor fitted on the still volumes with the gradient rotated by R_v^T (in the bvec
    frame): it matches to < 1 %, far better than the unrotated gradient or the inverse motion."""
    from scipy.ndimage import binary_erosion, map_coordinates

    sub = "01"
    img, bvals, bvecs = read_dwi(clean, sub)
    data = img.get_fdata(dtype=np.float32)
    aff = img.affine
    motion = json.loads((truth_dir(clean, sub) / f"sub-{sub}_desc-motion_timeseries.json").read_text())
    moved = motion["MovedVolumes"]
    mats = np.array(motion["Matrices"])
    rows = list(csv.DictReader(open(truth_dir(clean, sub) / f"sub-{sub}_desc-motion_timeseries.tsv"),
                               delimiter="\t"))
    assert len(rows) == len(bvals) and 3 <= len(moved) <= 4 and 0 not in moved
    for v, row in enumerate(rows):
        r = [float(row[f"rot_{a}"]) for a in "xyz"]
        t = [float(row[f"trans_{a}"]) for a in "xyz"]
        np.testing.assert_allclose(mats[v], sim.motion_matrix(np.array(r), np.array(t),
                                                              np.array(motion["RotationCentreMm"])), atol=1e-7)
        assert (v in moved) == bool(np.any(r) or np.any(t))
    still = [v for v in range(len(bvals)) if v not in moved]
    mask = truth(clean, sub, "desc-brain_mask") > 0
    D = fit_tensor(data, bvals, bvecs, mask, still).quadratic_form      # in the bvec (voxel) frame
    core = np.argwhere(binary_erosion(truth(clean, sub, "label-WM_probseg") > 0.9))
    s0 = data[..., [v for v in still if bvals[v] == 0]].mean(-1)[tuple(core.T)]
    Dc = D[tuple(core.T)]
    A = aff[:3, :3] / np.abs(aff[:3, :3]).sum(0)                      # voxel axes -> scanner axes
    world = core @ aff[:3, :3].T + aff[:3, 3]
    checked = 0
    for v in moved:
        if bvals[v] == 0:
            continue
        M = mats[v]
        R = M[:3, :3]

        def observed(m):
            x = world @ m[:3, :3].T + m[:3, 3]
            return map_coordinates(data[..., v], np.linalg.solve(aff[:3, :3], (x - aff[:3, 3]).T), order=1)

        def predicted(g):
            return s0 * np.exp(-bvals[v] * np.einsum("i,nij,j->n", g, Dc, g))

        def err(obs, pred):
            return np.median(np.abs(obs - pred) / pred)

        g = bvecs[v]
        right = err(observed(M), predicted(np.linalg.inv(A) @ R.T @ A @ g))
        unrotated = err(observed(M), predicted(g))
        inverse = err(observed(np.linalg.inv(M)), predicted(np.linalg.inv(A) @ R.T @ A @ g))
        assert right < 0.01 and right < 0.5 * unrotated and right < 0.5 * inverse, (v, right, unrotated, inverse)
        checked += 1
    assert checked >= 1


def test_no_motion_flag(clean0):
    for sub in ("01", "02"):
        motion = json.loads((truth_dir(clean0, sub) / f"sub-{sub}_desc-motion_timeseries.json").read_text())
        assert motion["MovedVolumes"] == []
        np.testing.assert_allclose(np.array(motion["Matrices"]), np.broadcast_to(np.eye(4), (9, 4, 4)))


# --- the default (noisy) tiny dataset -----------------------------------------------

def test_validator_reports_no_errors(tiny_bids):
    report = validate(tiny_bids, recursive=True)
    assert errors_of(report) == []
    assert sorted(report["summary"]["subjects"]) == ["01", "02"]


def test_participants(tiny_bids):
    rows = participants(tiny_bids)
    assert list(rows[0]) == ["participant_id", "diagnosis", "age", "sex", "site"]
    assert [r["participant_id"] for r in rows] == ["sub-01", "sub-02"]
    assert sorted(r["diagnosis"] for r in rows) == ["ADHD", "TD"]
    for r in rows:
        assert 7.0 <= float(r["age"]) <= 17.0 and r["sex"] in ("M", "F") and r["site"] in sim.SITES
    meta = json.loads((tiny_bids / "participants.json").read_text())
    assert set(meta) == {"participant_id", "diagnosis", "age", "sex", "site"}
    assert set(meta["diagnosis"]["Levels"]) == {"ADHD", "TD"}
    desc = json.loads((tiny_bids / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["BIDSVersion"]
    tdesc = json.loads((tiny_bids / "derivatives" / "truth" / "dataset_description.json").read_text())
    assert tdesc["DatasetType"] == "derivative" and tdesc["GeneratedBy"][0]["Name"] == "bids_adhd"
    # 20 subjects: balanced
    subs = sim._participants(20, 0)
    assert sum(s.diagnosis == "ADHD" for s in subs) == 10


def test_files_shapes_and_btable(tiny_bids):
    protocol = sim.SIZES["demo"]
    n_vol = protocol.n_b0 + TINY_BIDS_ARGS["directions"]
    for sub in ("01", "02"):
        img, bvals, bvecs = read_dwi(tiny_bids, sub)
        assert img.shape == tuple(protocol.shape) + (n_vol,)
        assert img.get_data_dtype() == np.int16 and img.header.get_slope_inter() in ((1.0, 0.0), (None, None))
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        assert np.allclose(img.header.get_zooms()[:3], protocol.voxel_mm)
        aff = img.affine
        assert np.allclose(aff[:3, :3], np.diag([-2.5, 2.5, 2.5]))     # axis aligned, LAS
        assert bvals.shape == (n_vol,) and bvecs.shape == (n_vol, 3)
        assert bvals[0] == 0 and (bvals == 0).sum() == protocol.n_b0 and set(bvals[bvals > 0]) == {1000.0}
        np.testing.assert_allclose(np.linalg.norm(bvecs[bvals > 0], axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(bvecs[bvals == 0], 0)
        side = json.loads((tiny_bids / f"sub-{sub}" / "dwi" / f"sub-{sub}_dwi.json").read_text())
        assert side["PhaseEncodingDirection"] == "j-"
        for key in ("TotalReadoutTime", "EchoTime", "RepetitionTime"):
            assert side[key] > 0
        t1 = nib.load(str(tiny_bids / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz"))
        assert t1.shape == protocol.t1_shape and np.allclose(t1.header.get_zooms(), protocol.t1_voxel_mm)
        assert (tiny_bids / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.json").is_file()
        # truth: every map on the DWI grid
        td = truth_dir(tiny_bids, sub)
        names = [f"model-tensor_param-{p}_dwimap" for p in ("fa", "md", "ad", "rd")] + \
            ["desc-brain_mask", "desc-effect_mask"] + [f"label-{t}_probseg" for t in ("WM", "GM", "CSF")]
        for name in names:
            timg = nib.load(str(td / f"sub-{sub}_{name}.nii.gz"))
            assert timg.shape == tuple(protocol.shape) and np.allclose(timg.affine, aff), name
        brain = truth(tiny_bids, sub, "desc-brain_mask") > 0
        assert 1.5e6 < brain.sum() * 2.5 ** 3 < 2.3e6                  # mm³: a brain
        data = np.asarray(img.dataobj)
        b0 = data[..., 0].astype(float)
        assert b0[brain].mean() > 10 * b0[~brain].mean()                # brain bright, background noise
        # pose: template -> scanner; the brain centre sits at the grid centre
        pose = json.loads((td / f"sub-{sub}_desc-pose_xfm.json").read_text())
        P = np.array(pose["TemplateToScanner"])
        R = sim.rotation_matrix(*np.radians(pose["RotationDegrees"]))
        np.testing.assert_allclose(P[:3, :3], pose["Scale"] * R, atol=1e-12)
        np.testing.assert_allclose(P[:3, 3], pose["TranslationMm"], atol=1e-12)
        np.testing.assert_allclose(np.array(pose["ScannerToTemplate"]) @ P, np.eye(4), atol=1e-9)
        assert np.all(np.abs(pose["RotationDegrees"]) <= sim.POSE_MAX_ROT_DEG)
        assert np.all(np.abs(pose["TranslationMm"]) <= sim.POSE_MAX_SHIFT_MM)
        mid = aff @ np.r_[(np.array(protocol.shape) - 1) / 2, 1]
        np.testing.assert_allclose(P @ np.r_[sim.BRAIN_CENTRE_MNI, 1], mid, atol=1e-4)   # header: float32
        np.testing.assert_allclose(pose["DwiAffine"], aff, atol=1e-4)
        # motion: fMRIPrep columns, one row per volume, first volume never moved
        rows = list(csv.DictReader(open(td / f"sub-{sub}_desc-motion_timeseries.tsv"), delimiter="\t"))
        assert list(rows[0]) == ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
        assert len(rows) == n_vol and all(float(x) == 0 for x in rows[0].values())
        moved = [r for r in rows if any(float(x) for x in r.values())]
        assert 3 <= len(moved) <= 4
        for r in moved:
            assert max(abs(float(r[f"trans_{a}"])) for a in "xyz") <= sim.MOTION_MAX_SHIFT_MM
            assert max(abs(float(r[f"rot_{a}"])) for a in "xyz") <= np.radians(sim.MOTION_MAX_ROT_DEG)


def test_eddy_and_dropout_truth(tiny_bids):
    """On by default: eddy matrices move points along the phase-encoding axis only (b0s: identity),
    in proportion to b * g; the dropout slices are DW slices inside the brain whose signal fell."""
    for sub in ("01", "02"):
        img, bvals, bvecs = read_dwi(tiny_bids, sub)
        td = truth_dir(tiny_bids, sub)
        eddy = json.loads((td / f"sub-{sub}_desc-eddy_xfm.json").read_text())
        V, W = np.array(eddy["VoxelMatrices"]), np.array(eddy["Matrices"])
        aff = img.affine
        assert eddy["PhaseEncodingAxis"] == 1 and V.shape == (len(bvals), 4, 4)
        for v in range(len(bvals)):
            np.testing.assert_allclose(W[v], aff @ V[v] @ np.linalg.inv(aff), atol=1e-4)
            np.testing.assert_allclose(np.delete(V[v], 1, 0), np.delete(np.eye(4), 1, 0), atol=0)
            assert np.allclose(V[v], np.eye(4)) == (bvals[v] == 0), v
        # the linear-part coefficients are per-subject constants times b/1000 * g_scanner
        g = bvecs * np.array([-1.0, 1, 1]) * (bvals[:, None] / 1000.0)
        dw = bvals > 0
        coef = (V[dw, 1, :3] - np.eye(3)[1]) / np.where(np.abs(g[dw]) > 1e-6, g[dw], np.nan)
        assert np.nanstd(coef, axis=0).max() < 1e-6 and np.all(np.abs(np.nanmean(coef, 0)) <= 0.012)
        drop = json.loads((td / f"sub-{sub}_desc-dropout_timeseries.json").read_text())
        rows = list(csv.DictReader(open(td / f"sub-{sub}_desc-dropout_timeseries.tsv"), delimiter="\t"))
        assert 2 <= len(drop["Slices"]) <= 4 and drop["SliceAxis"] == 2
        assert sum(int(r["dropout_slices"]) for r in rows) == len(drop["Slices"]) and len(rows) == len(bvals)
        data = np.asarray(img.dataobj, dtype=float)
        brain = truth(tiny_bids, sub, "desc-brain_mask") > 0
        for (v, k), frac in zip(drop["Slices"], drop["SignalFraction"]):
            assert bvals[v] > 0 and 0.05 <= frac <= 0.5
            others = [u for u in np.flatnonzero(dw) if u != v]
            ratio = data[..., k, v][brain[..., k]].mean() / data[..., k, others].mean(-1)[brain[..., k]].mean()
            assert ratio < 0.75, (v, k, frac, ratio)


def test_sessions_and_per_subject_direction_counts(tmp_path):
    root = sim.simulate_dataset(tmp_path / "ses", n_subjects=2, seed=4, sessions=2, directions=[6, 8], n_jobs=2)
    assert errors_of(validate(root)) == []
    poses = []
    for sub, n_dirs in (("01", 6), ("02", 8)):
        for ses in ("01", "02"):
            stem = root / f"sub-{sub}" / f"ses-{ses}" / "dwi" / f"sub-{sub}_ses-{ses}_dwi"
            assert nib.load(f"{stem}.nii.gz").shape[3] == 3 + n_dirs
            assert len(np.loadtxt(f"{stem}.bval")) == 3 + n_dirs
            assert (root / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"sub-{sub}_ses-{ses}_T1w.nii.gz").is_file()
            td = truth_dir(root, sub, ses)
            assert (td / f"sub-{sub}_ses-{ses}_model-tensor_param-fa_dwimap.nii.gz").is_file()
            poses.append(json.loads((td / f"sub-{sub}_ses-{ses}_desc-pose_xfm.json").read_text())["TemplateToScanner"])
    assert not np.allclose(poses[0], poses[1])                         # a new head pose per session


# --- determinism, command line, atomic output ----------------------------------

def test_cli_reproduces_the_api_byte_for_byte(tiny_bids, tmp_path, capsys):
    out = tmp_path / "again"
    out.mkdir()                                                        # an existing EMPTY folder is fine
    args = ["simulate", str(out), "--subjects", "2", "--seed", str(TINY_BIDS_ARGS["seed"]),
            "--size", "demo", "--directions", str(TINY_BIDS_ARGS["directions"]), "--nprocs", "1", "-q"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert tree_digest(out) == tree_digest(tiny_bids)                  # same seed, same bytes (1 vs 2 threads)
    assert oct(os.stat(out / "participants.tsv").st_mode & 0o777) != "0o600"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_refuses_non_empty_out_dir(tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["simulate", str(out), "--subjects", "2"]) == 73
    err = capsys.readouterr().err.strip()
    assert err.startswith("bids_adhd: error:") and "not empty" in err and "\n" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]      # no temporary folder either


@pytest.mark.parametrize("extra,needle", [
    (["--subjects", "1"], "--subjects"),
    (["--effect", "0.9"], "--effect"),
    (["--effect", "-0.1"], "--effect"),
    (["--size", "huge"], "huge"),
    (["--snr", "-3"], "--snr"),
    (["--sessions", "0"], "--sessions"),
    (["--directions", "5"], "--directions"),
])
def test_cli_usage_errors(tmp_path, capsys, extra, needle):
    out = tmp_path / "never"
    assert main(["simulate", str(out)] + extra) == 64
    err = capsys.readouterr().err.strip()
    assert err.startswith("bids_adhd: error:") and needle in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_api_errors(tmp_path):
    from bids_adhd.errors import OutputError, UsageError

    with pytest.raises(UsageError):
        sim.simulate_dataset(tmp_path / "x", n_subjects=2, size="tiny")
    with pytest.raises(UsageError):
        sim.simulate_dataset(tmp_path / "x", n_subjects=2, effect=0.95)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError):
        sim.simulate_dataset(tmp_path / "file", n_subjects=2)


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    real = sim._simulate_run
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sim, "_simulate_run", flaky)
    with pytest.raises(KeyboardInterrupt):
        sim.simulate_dataset(tmp_path / "out", n_subjects=2, directions=6)
    assert len(calls) == 1
    assert list(tmp_path.iterdir()) == []


def test_motion_confound_scales_only_adhd_subjects_motion(tmp_path):
    """--motion-confound F: the ADHD subject's per-volume motion is (1 + F) times the same draw without
    it; the TD subject's is unchanged (truth motion tables of two otherwise identical datasets)."""
    kw = dict(n_subjects=2, seed=2, size="demo", directions=6, snr=0, effect=0.0)
    base = sim.simulate_dataset(tmp_path / "base", **kw)
    conf = sim.simulate_dataset(tmp_path / "conf", motion_confound=2.0, **kw)
    rows = {r["participant_id"][4:]: r["diagnosis"] for r in csv.DictReader(open(base / "participants.tsv"),
                                                                               delimiter="\t")}
    assert sorted(rows.values()) == ["ADHD", "TD"]
    cols = [f"{k}_{a}" for k in ("rot", "trans") for a in "xyz"]
    for sub, dx in rows.items():
        def table(root):
            f = truth_dir(root, sub) / f"sub-{sub}_desc-motion_timeseries.tsv"
            return np.array([[float(r[c]) for c in cols] for r in csv.DictReader(open(f), delimiter="\t")])
        a, b = table(base), table(conf)
        assert np.abs(a).max() > 0
        assert np.allclose(b, 3.0 * a if dx == "ADHD" else a, atol=1e-6), sub
    assert json.loads((conf / "derivatives" / "truth" / "truth.json").read_text())["MotionModel"][
        "adhd_motion_factor"] == 3.0

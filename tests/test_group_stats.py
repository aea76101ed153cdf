"""Issue 13 through the group level (tiny stand-in model, synthetic template-space maps, ~15 s per run):
every statistics field in metrics.json, the report's sections, the saliency NIfTI, a motion confound
flagged, leave-one-site-out folds, and the calibration never fitted on test subjects."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from bids_adhd import derivatives as dv
from test_group_common import GROUP_ARGS, patch_tiny, synthetic, tiny_pipeline


def _write_confounds(out, rows, fd_adhd=0.6, fd_td=0.1):
    """Participant-level confounds TSVs: ADHD subjects move more (a motion-diagnosis confound)."""
    rng = np.random.default_rng(0)
    for r in rows:
        src = dv.Source(subject=r["participant_id"][4:])
        fd = (fd_adhd if r["diagnosis"] == "ADHD" else fd_td) + rng.uniform(0, 0.05, 10)
        dv.write_tsv(dv.confounds(out, src), {"framewise_displacement": ["n/a"] + [float(v) for v in fd[1:]]})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from bids_adhd.cli import main

    tmp = tmp_path_factory.mktemp("gstats")
    bids, out, rows = synthetic(tmp, n=12, seed=3)
    _write_confounds(out, rows)
    mp = pytest.MonkeyPatch()
    patch_tiny(mp)
    try:
        code = main([str(bids), str(out), "group", "--pipeline", str(tiny_pipeline(tmp, folds=3)),
                     "--permutations", "50", "-q", *GROUP_ARGS])
    finally:
        mp.undo()
    assert code == 0
    return {"bids": bids, "out": out, "rows": rows, "tmp": tmp,
            "metrics": json.loads((out / "group" / "metrics.json").read_text())}


def test_intervals_contain_the_estimates(run):
    pooled = run["metrics"]["pooled"]
    for k in ("auc", "balanced_accuracy", "sensitivity", "specificity", "brier"):
        low, high = pooled[f"{k}_ci95"]
        assert low <= pooled[k] <= high, k
    assert 0 <= pooled["brier"] <= 1 and "bootstrap" in pooled["ci_method"]


def test_permutation_threshold_and_calibration_fields(run):
    m = run["metrics"]
    perm = m["permutation"]
    assert perm["n"] == 50 and len(perm["null_auc"]["values"]) == 50
    assert 1 / 51 <= perm["p_value"] <= 1 and "weaker" in perm["what_is_permuted"]
    assert len(m["threshold"]["folds"]) == 3 and "inner-validation" in m["threshold"]["method"]
    assert 0 < m["threshold"]["final"] < 1
    cals = m["calibration"]["folds"]
    assert all(c["method"] == "platt-map" and c["n"] >= 2 for c in cals)
    assert m["calibration"]["final"]["n"] >= 2


def test_calibration_is_fitted_on_inner_validation_subjects_only(run):
    """Each fold's calibration n equals its inner-validation size, and those subjects are never its test ones."""
    for k, cal in enumerate(run["metrics"]["calibration"]["folds"], start=1):
        fold = json.loads((run["out"] / "group" / f"fold-{k}" / "metrics.json").read_text())
        assert cal["n"] == len(fold["inner_val"]) == len(fold["inner_val_predictions"])
        assert not set(fold["inner_val_predictions"]) & set(fold["test"])
        raw = np.array([fold["predictions_uncalibrated"][s] for s in fold["test"]])
        from bids_adhd.learn.stats import apply_platt
        assert np.allclose(apply_platt(raw, cal), [fold["predictions"][s] for s in fold["test"]])


def test_motion_confound_is_found_and_flagged(run):
    conf = run["metrics"]["confounds"]
    assert set(conf["columns"]) == {"age", "sex", "site", "mean_fd"}
    assert conf["alone"]["mean_fd"]["auc"] == 1.0 and conf["alone"]["mean_fd"]["auc_ci95"][0] > 0.5
    assert "mean_fd" in conf["flagged"]
    assert "spearman_r" in conf["score_vs"]["mean_fd"] and "levels" in conf["score_vs"]["site"]
    report = (run["out"] / "group" / "report.html").read_text()
    assert "predict the label on their own" in report and "mean_fd" in report


def test_saliency_nifti_on_the_template_grid_and_report_sections(run):
    from bids_adhd.config import load_pipeline
    from bids_adhd.dmri.template import template_grid

    g = run["out"] / "group"
    img = nib.load(str(dv.saliency_map(g)))
    shape, affine = template_grid(load_pipeline("fast").template)
    assert img.shape == tuple(shape) and np.allclose(img.affine, affine) and int(img.header["sform_code"]) == 4
    data = np.asarray(img.get_fdata())
    assert np.isfinite(data).all() and data.max() > 0
    side = json.loads(dv.saliency_map(g).with_name(dv.saliency_map(g).name.replace(".nii.gz", ".json")).read_text())
    assert side["Method"] == "monai.visualize.VanillaGrad" and len(side["Folds"]) == 3
    report = (g / "report.html").read_text()
    for title in ("Uncertainty", "Permutation test", "Calibration and threshold", "Confounds",
                  "Where the model looks"):
        assert f"<h2>{title}</h2>" in report
    for fig in ("permutation_null.png", "reliability.png", "saliency.png"):
        assert (g / "figures" / fig).is_file()


def test_leave_one_site_out(tmp_path, monkeypatch):
    from bids_adhd.cli import main

    bids, out, rows = synthetic(tmp_path, n=12, seed=4)
    patch_tiny(monkeypatch)
    assert main([str(bids), str(out), "group", "--pipeline", str(tiny_pipeline(tmp_path)), "--cv", "site",
                 "--permutations", "0", "--confounds", "none", "--no-saliency", "-q", *GROUP_ARGS]) == 0
    m = json.loads((out / "group" / "metrics.json").read_text())
    sites = sorted({r["site"] for r in rows})
    assert m["cv"] == "site" and len(m["folds"]) == len(sites)
    folds = [ln.split("\t") for ln in (out / "group" / "folds.tsv").read_text().splitlines()[1:]]
    site_of = {r["participant_id"]: r["site"] for r in rows}
    assert all(int(f) - 1 == sites.index(site_of[p]) for p, f, _ in folds)
    assert "permutation" not in m and m["saliency"] is None

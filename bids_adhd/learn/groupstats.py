"""The group level's statistics, run on the cross-validation's results (see docs/group.md).

* :func:`calibrate_fold` — per fold: the model's probabilities of its inner
  validation subjects → MAP Platt scaling (:func:`stats.fit_platt`) and the
  Youden threshold on the calibrated probabilities; never the test fold;
* :func:`pooled_with_cis` — pooled metrics at the per-fold thresholds, Brier
  score, subject-level bootstrap intervals;
* :func:`permutation_test` — the within-fold label permutation test of the
  frozen-feature read-out (what is permuted and why it is weaker: see its
  docstring);
* :func:`confound_report` — confounds alone (participants.tsv columns and
  mean FD from the participant level's confounds) in the same folds, and the
  classifier's score against each.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import derivatives as dv
from . import stats

LOG = logging.getLogger("bids_adhd.group")

DEFAULT_CONFOUNDS = ("age", "sex", "site", "mean_fd")
#: confound-only AUC whose 95 % CI lies above this is flagged in the log and the report
FLAG_AUC = 0.5


@dataclass(frozen=True)
class StatsOptions:
    cv: str = "stratified"              # stratified | site (leave-one-site-out)
    permutations: int = 200             # label permutations of the frozen-feature read-out (0: none)
    bootstrap: int = 1000               # subject resamples for the 95 % intervals
    confounds: tuple = DEFAULT_CONFOUNDS
    calibration_prior_sd: float = 1.0   # Platt MAP prior: slope ~ N(1, sd²), intercept ~ N(0, sd²)
    saliency: bool = True
    seed: int = 0
    harmonize: str = "none"             # none | combat (of the frozen features, per training fold: harmonize.py)


def stats_options(settings, seed: int) -> StatsOptions:
    """The statistics' options from the group level's settings (validated there; defaults where None)."""
    n = settings.permutations
    n = StatsOptions.permutations if n is None else int(n)
    conf = settings.confounds
    conf = DEFAULT_CONFOUNDS if conf is None else tuple(c for c in conf if c and c.lower() != "none")
    return StatsOptions(cv=settings.cv, permutations=n, confounds=conf, saliency=settings.saliency, seed=int(seed),
                        harmonize=settings.harmonize)


# --- calibration and threshold, per fold ------------------------------------------------

def calibrate_fold(val_probs: dict, val_labels: dict, prior_sd: float) -> tuple[dict, float]:
    """(Platt MAP calibration, Youden threshold) from the inner-validation subjects' probabilities."""
    subs = sorted(val_probs)
    p = [val_probs[s] for s in subs]
    y = [int(val_labels[s]) for s in subs]
    cal = stats.fit_platt(p, y, prior_sd)
    thr = stats.youden_threshold(y, stats.apply_platt(p, cal))
    return cal, thr


def pooled_with_cis(y, prob, thresholds, n_boot: int, seed: int) -> dict:
    """binary_metrics at the per-subject thresholds + Brier + ``<metric>_ci95`` (percentile bootstrap)."""
    from sklearn.metrics import brier_score_loss

    from .metrics import binary_metrics

    y = np.asarray(y, int)
    p = np.asarray(prob, float)
    thr = np.asarray(thresholds, float)
    out = binary_metrics(y, p, thr)
    out["brier"] = float(brier_score_loss(y, p))
    cis = stats.bootstrap_cis(y, p, (p >= thr).astype(int), n_boot, seed)
    for k, ci in cis.items():
        out[f"{k}_ci95"] = ci
    out["ci_method"] = (f"subject-level percentile bootstrap, {n_boot} resamples (seed {seed}); sensitivity, "
                        "specificity and balanced accuracy at each fold's own threshold")
    return out


# --- permutation test -------------------------------------------------------------------

def permutation_test(features: np.ndarray, y, folds, n: int, seed: int, model_auc=None) -> dict:
    """Within-fold label permutations of the frozen-feature read-out.

    The statistic is the pooled out-of-fold AUC of a standardised linear ridge
    classifier on the encoder's pooled features *as built* (before any LoRA
    fine-tuning; :func:`stats.frozen_feature_auc`), in the run's own folds.
    Each permutation shuffles the labels among the subjects of each fold and
    refits that read-out. The LoRA fine-tuning is NOT repeated per permutation
    (it costs a full cross-validation each): the test asks whether the frozen
    features carry label information, which is weaker than testing the
    fine-tuned model itself. ``model_auc`` (the fine-tuned model's pooled AUC)
    is recorded next to the null for reference only.
    """
    y = np.asarray(y, int)
    observed = stats.frozen_feature_auc(features, y, folds)
    null = stats.permutation_null(features, y, folds, n, seed) if n else np.zeros(0)
    out = {"n": int(n), "seed": int(seed), "statistic": "pooled out-of-fold AUC of the frozen-feature read-out",
           "observed_auc": observed, "p_value": stats.permutation_p_value(observed, null) if n else None,
           "model_auc": model_auc,
           "what_is_permuted": "labels shuffled among the subjects of each fold (class counts per fold kept); "
                               "a standardised ridge read-out of the encoder's pooled features as built (no "
                               "fine-tuning) refitted per permutation in the same folds; the LoRA fine-tuning is "
                               "not repeated, so this tests the frozen features, a weaker test than re-training "
                               "the whole model per permutation"}
    if n:
        q = np.percentile(null, [5, 50, 95])
        out["null_auc"] = {"mean": float(null.mean()), "sd": float(null.std(ddof=1)) if n > 1 else 0.0,
                           "q05": float(q[0]), "median": float(q[1]), "q95": float(q[2]),
                           "max": float(null.max()), "values": [round(float(v), 4) for v in null]}
    return out


# --- confounds ---------------------------------------------------------------------------

def mean_fd(out_root: Path, runs) -> float | None:
    """Mean framewise displacement over a subject's runs (participant-level confounds TSV), or None."""
    vals = []
    for rm in runs:
        path = dv.confounds(out_root, rm.source)
        if not path.is_file():
            continue
        lines = [ln.split("\t") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not lines or "framewise_displacement" not in lines[0]:
            continue
        j = lines[0].index("framewise_displacement")
        fd = [float(r[j]) for r in lines[1:] if len(r) > j and r[j] not in ("n/a", "")]
        if fd:
            vals.append(float(np.mean(fd)))
    return float(np.mean(vals)) if vals else None


def read_confounds(bids_dir: Path, out_root: Path, subjects, runs: dict, columns) -> dict[str, list]:
    """column → value per subject (participants.tsv columns; ``mean_fd`` from the confounds TSVs)."""
    from ..bids import read_participants

    rows = {(r["participant_id"][4:] if r["participant_id"].startswith("sub-") else r["participant_id"]): r
            for r in read_participants(bids_dir)}
    table = {}
    for c in columns:
        if c == "mean_fd":
            vals = [mean_fd(out_root, runs[s]) for s in subjects]
        elif any(c in r for r in rows.values()):
            vals = [rows.get(s, {}).get(c) for s in subjects]
        else:
            LOG.warning("confound %r: no such participants.tsv column; left out", c)
            continue
        if all(v is None for v in vals):
            LOG.warning("confound %r: no values for these subjects; left out", c)
            continue
        table[c] = vals
    return table


def _is_numeric(vals) -> bool:
    try:
        [float(v) for v in vals if v is not None]
        return True
    except (TypeError, ValueError):
        return False


def confound_report(table: dict, y, folds, score, n_boot: int, seed: int) -> dict:
    """Per confound and all together: out-of-fold AUC (+ CI) of the confound alone; score vs confound."""
    y = np.asarray(y, int)
    numeric = [c for c in table if _is_numeric(table[c])]
    out = {"columns": list(table), "numeric": numeric, "model": "logistic regression on the confound(s) alone "
           "(numeric standardised, categorical one-hot), fitted on each training fold, same folds", "alone": {},
           "score_vs": {}, "flagged": []}
    sets = [(c, {c: table[c]}) for c in table] + ([("all", table)] if len(table) > 1 else [])
    for name, sub in sets:
        p = stats.confound_predictions(sub, y, folds, numeric)
        auc = float(stats.auc_rows(y, p)[0])
        ci = stats.bootstrap_cis(y, p, (p >= 0.5).astype(int), n_boot, seed)["auc"]
        missing = sum(v is None for c in sub for v in sub[c])
        out["alone"][name] = {"auc": auc, "auc_ci95": ci, "missing_values": int(missing)}
        if ci is not None and ci[0] > FLAG_AUC:
            out["flagged"].append(name)
    for c in table:
        out["score_vs"][c] = stats.score_vs_confound(score, table[c], c in numeric, y)
    for name in out["flagged"]:
        LOG.warning("confound %s alone predicts the label (AUC %.2f, 95%% CI %.2f-%.2f): the classifier may "
                    "be reading it; see the report's confound section", name, out["alone"][name]["auc"],
                    *out["alone"][name]["auc_ci95"])
    return out

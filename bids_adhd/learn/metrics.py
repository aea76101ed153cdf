"""Binary classification metrics (scikit-learn), per fold and pooled.

All metrics treat class 1 (the ``--positive`` value, e.g. ADHD) as positive and
threshold the predicted probability at ``threshold`` (0.5). AUC is ``None``
when only one class is present (it is undefined there).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

METRIC_KEYS = ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "f1")


def _none_if_nan(v):
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def binary_metrics(y_true: Sequence[int], prob: Sequence[float], threshold: float = 0.5) -> dict:
    """accuracy, balanced_accuracy, auc, sensitivity, specificity, f1 and n."""
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                                 roc_auc_score)

    y = np.asarray(y_true, int)
    p = np.asarray(prob, float)
    if y.size == 0:
        return {**{k: None for k in METRIC_KEYS}, "n": 0}
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    both = len(np.unique(y)) == 2
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if both else None,
        "auc": float(roc_auc_score(y, p)) if both else None,
        "sensitivity": float(tp / (tp + fn)) if (tp + fn) else None,
        "specificity": float(tn / (tn + fp)) if (tn + fp) else None,
        "f1": float(f1_score(y, pred, zero_division=0)),
        "n": int(y.size),
    }


def summarise(folds: list[dict]) -> dict:
    """Mean and sample SD over folds of each metric (folds where it is undefined left out)."""
    out = {}
    for k in METRIC_KEYS:
        vals = [f[k] for f in folds if f.get(k) is not None]
        if vals:
            out[k] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                      "n_folds": len(vals)}
        else:
            out[k] = {"mean": None, "sd": None, "n_folds": 0}
    return out


def roc_points(y_true, prob) -> dict | None:
    """``{"fpr": [...], "tpr": [...]}`` or None when one class only."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true, int)
    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, _ = roc_curve(y, np.asarray(prob, float))
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def format_metrics(m: dict) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"
    return ", ".join(f"{k} {f(m.get(k))}" for k in METRIC_KEYS) + f" (n={m.get('n')})"

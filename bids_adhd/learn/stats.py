"""Group statistics a reviewer asks for: intervals, permutation test, calibration, threshold, confounds.

Plain functions on arrays (no files, no torch), each checked against
scikit-learn or SciPy in ``tests/test_stats.py``:

* :func:`bootstrap_cis` — subject-level percentile bootstrap 95 % intervals of
  AUC, balanced accuracy, sensitivity, specificity and the Brier score (one
  resample of subjects is used for every metric; resamples with one class only
  are drawn again);
* :func:`permutation_p_value` — ``(1 + #{null >= observed}) / (1 + n)``
  (Phipson & Smyth 2010; what ``sklearn.model_selection.permutation_test_score``
  returns);
* :func:`frozen_feature_auc` / :func:`permutation_null` — the permutation test's
  statistic: pooled out-of-fold AUC of a standardised linear ridge classifier
  on fixed features within given folds, and its distribution under permuted
  labels (same folds; all permutations in one matrix product);
* :func:`fit_platt` / :func:`apply_platt` — Platt scaling with a Gaussian prior
  centred on the identity map (slope 1, intercept 0): with the 3-4 subjects of
  an inner validation split the fit stays near the model's own scores instead
  of collapsing to 0/1;
* :func:`youden_threshold` — the threshold maximising sensitivity + specificity
  on (inner-validation) data, ties broken towards 0.5;
* :func:`reliability` — the reliability diagram's bins (``sklearn.calibration``);
* :func:`confound_predictions` — how well confounds alone predict the label
  in the same folds (out-of-fold probabilities).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

#: metrics with a bootstrap interval (``pooled.<name>_ci95``)
CI_KEYS = ("auc", "balanced_accuracy", "sensitivity", "specificity", "brier")
EPS = 1e-6


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, float), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, float)))


# --- AUC and the bootstrap ------------------------------------------------------------

def auc_rows(y: np.ndarray, score: np.ndarray) -> np.ndarray:
    """ROC AUC of every row of ``score`` (R, N) against labels ``y`` (R, N) (Mann-Whitney, mid-ranks).

    NaN where a row has one class only. Equals ``sklearn.metrics.roc_auc_score`` row by row.
    """
    from scipy.stats import rankdata

    y = np.atleast_2d(np.asarray(y, int))
    score = np.atleast_2d(np.asarray(score, float))
    ranks = rankdata(score, axis=1)
    n1 = y.sum(axis=1).astype(float)
    n0 = y.shape[1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        u = (ranks * y).sum(axis=1) - n1 * (n1 + 1) / 2
        return np.where((n1 > 0) & (n0 > 0), u / (n1 * n0), np.nan)


def _rates(y: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = (pred * y).sum(1) / y.sum(1)
        spec = ((1 - pred) * (1 - y)).sum(1) / (1 - y).sum(1)
    return {"sensitivity": sens, "specificity": spec, "balanced_accuracy": (sens + spec) / 2}


def resample_indices(y, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, N) subject indices drawn with replacement; every row holds both classes."""
    y = np.asarray(y, int)
    rng = np.random.default_rng([int(seed), 13])
    idx = rng.integers(0, len(y), size=(n_boot, len(y)))
    for _ in range(100):                                  # redraw the (rare) one-class rows
        bad = np.flatnonzero(np.ptp(y[idx], axis=1) == 0)
        if not len(bad):
            break
        idx[bad] = rng.integers(0, len(y), size=(len(bad), len(y)))
    return idx


def bootstrap_cis(y, prob, pred, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile intervals ``{metric: [low, high]}`` over subject resamples (``CI_KEYS``).

    ``prob``: calibrated probabilities (AUC, Brier); ``pred``: the 0/1 decisions
    (sensitivity, specificity, balanced accuracy), so that per-fold thresholds are kept.
    """
    y = np.asarray(y, int)
    if len(np.unique(y)) < 2 or n_boot < 1:
        return {k: None for k in CI_KEYS}
    idx = resample_indices(y, n_boot, seed)
    yb, pb, db = y[idx], np.asarray(prob, float)[idx], np.asarray(pred, int)[idx]
    draws = {"auc": auc_rows(yb, pb), **_rates(yb, db), "brier": ((pb - yb) ** 2).mean(1)}
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {k: [float(v) for v in np.percentile(draws[k], q)] for k in CI_KEYS}


# --- permutation test -------------------------------------------------------------------

def permutation_p_value(observed: float, null: Sequence[float]) -> float:
    """``(1 + #{null >= observed}) / (1 + len(null))``: never 0, exact under exchangeability."""
    null = np.asarray(null, float)
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + null.size))


def oof_scores(features: np.ndarray, y, folds: Sequence[int], model_factory) -> np.ndarray:
    """Out-of-fold P(positive) of ``model_factory()`` fitted on each training fold (``folds``: fold per row)."""
    X = np.asarray(features)
    y = np.asarray(y, int)
    folds = np.asarray(folds)
    out = np.full(len(y), np.nan)
    for k in np.unique(folds):
        test = folds == k
        train_y = y[~test]
        if len(np.unique(train_y)) < 2:               # a permutation can leave one class: no information
            out[test] = train_y.mean()
            continue
        est = model_factory().fit(X[~test], train_y)
        out[test] = est.predict_proba(X[test])[:, 1]
    return out


def ridge_oof_scores(features, y, folds, alpha: float | None = None) -> np.ndarray:
    """Out-of-fold decision scores of a standardised linear ridge classifier, one column per label vector.

    ``y``: (N,) or (N, R) 0/1 labels. Within each training fold the features
    are standardised (mean/SD of the training rows) and the ridge solution in
    its dual form, ``w = Xᵀ(XXᵀ + αI)⁻¹(t - t̄)`` with targets ``t = ±1`` and the
    intercept ``t̄``, scores the test rows: the same numbers as scikit-learn's
    ``RidgeClassifier(alpha).decision_function`` (tested), but linear in the
    labels, so that all permutations are one matrix product. ``alpha``:
    default the number of features (the kernel's scale). ``features`` may
    also be a mapping fold → (N, F) array, the features as that fold's
    training rows transformed them (:func:`bids_adhd.learn.harmonize.fold_features`).
    """
    per_fold = features if isinstance(features, Mapping) else None
    t = 2.0 * np.asarray(y, float) - 1.0
    one = t.ndim == 1
    t = t[:, None] if one else t
    folds = np.asarray(folds)
    out = np.zeros(t.shape)
    for k in np.unique(folds):
        X = np.asarray(per_fold[k] if per_fold is not None else features, float)
        lam = float(X.shape[1] if alpha is None else alpha)
        te = folds == k
        mu, sd = X[~te].mean(0), X[~te].std(0)
        sd[sd == 0] = 1.0
        a, b = (X[~te] - mu) / sd, (X[te] - mu) / sd
        tm = t[~te].mean(0)
        gram = a @ a.T + lam * np.eye(len(a))
        out[te] = tm + (b @ a.T) @ np.linalg.solve(gram, t[~te] - tm)
    return out[:, 0] if one else out


def frozen_feature_auc(features, y, folds) -> float:
    """Pooled out-of-fold AUC of the standardised ridge read-out of fixed ``features``."""
    return float(auc_rows(np.asarray(y, int), ridge_oof_scores(features, y, folds))[0])


def permute_within_folds(y, folds, rng) -> np.ndarray:
    """``y`` shuffled among the subjects of each fold: every fold keeps its class counts
    (the stratified assignment stays valid), every subject keeps its fold."""
    y = np.asarray(y, int)
    folds = np.asarray(folds)
    out = y.copy()
    for k in np.unique(folds):
        members = np.flatnonzero(folds == k)
        out[members] = y[rng.permutation(members)]
    return out


def permutation_null(features, y, folds, n: int, seed: int) -> np.ndarray:
    """:func:`frozen_feature_auc` for ``n`` permutations of ``y`` within the folds, at once."""
    rng = np.random.default_rng([int(seed), 17])
    perms = np.stack([permute_within_folds(y, folds, rng) for _ in range(int(n))], axis=1)   # (N, n)
    scores = ridge_oof_scores(features, perms, folds)
    return auc_rows(perms.T, scores.T)


# --- calibration and threshold ----------------------------------------------------------

def fit_platt(prob, y, prior_sd: float = 1.0) -> dict:
    """MAP Platt scaling ``P = sigmoid(a·logit(p) + b)`` with priors a ~ N(1, sd²), b ~ N(0, sd²).

    Maximises the Bernoulli log-likelihood plus the log prior (L-BFGS). With no
    data it returns the identity (a=1, b=0); with many it approaches the
    unpenalised Platt fit (``LogisticRegression`` on the logit).
    """
    from scipy.optimize import minimize

    z = logit(prob)
    y = np.asarray(y, float)
    inv_var = 1.0 / float(prior_sd) ** 2

    def nll(theta):
        a, b = theta
        s = a * z + b
        # log(1 + e^s) - y·s, stably; gradient below
        val = np.sum(np.logaddexp(0.0, s) - y * s) + 0.5 * inv_var * ((a - 1) ** 2 + b ** 2)
        r = sigmoid(s) - y
        return val, np.array([np.sum(r * z) + inv_var * (a - 1), np.sum(r) + inv_var * b])

    res = minimize(nll, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return {"method": "platt-map", "slope": float(res.x[0]), "intercept": float(res.x[1]),
            "prior_sd": float(prior_sd), "n": int(y.size)}


def apply_platt(prob, calibration: Mapping | None) -> np.ndarray:
    """Calibrated probabilities; ``None`` (no calibration) returns ``prob`` unchanged."""
    if not calibration:
        return np.asarray(prob, float)
    return sigmoid(calibration["slope"] * logit(prob) + calibration["intercept"])


def youden_threshold(y, prob, default: float = 0.5) -> float:
    """argmax of sensitivity + specificity - 1 over thresholds between the sorted ``prob``.

    Candidates are the midpoints between distinct values (and ``default``);
    among equally good ones the closest to ``default`` wins. One class only:
    ``default``.
    """
    y = np.asarray(y, int)
    p = np.asarray(prob, float)
    if len(np.unique(y)) < 2:
        return float(default)
    u = np.unique(p)
    cands = np.unique(np.concatenate([(u[:-1] + u[1:]) / 2, [default]]))
    pred = (p[None, :] >= cands[:, None]).astype(int)
    j = _rates(np.broadcast_to(y, pred.shape), pred)["balanced_accuracy"]
    best = np.flatnonzero(j >= j.max() - 1e-12)
    return float(cands[best[np.argmin(np.abs(cands[best] - default))]])


def reliability(y, prob, n_bins: int = 5) -> dict:
    """Bins of equal width: mean predicted probability, observed fraction positive, count."""
    from sklearn.calibration import calibration_curve

    y = np.asarray(y, int)
    p = np.asarray(prob, float)
    frac, mean = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0, 1, n_bins + 1)
    counts = np.bincount(np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1), minlength=n_bins)
    return {"mean_predicted": mean.tolist(), "fraction_positive": frac.tolist(),
            "count": [int(c) for c in counts if c > 0], "n_bins": n_bins}


# --- confounds -------------------------------------------------------------------------

def _confound_model(numeric: list[int], categorical: list[int]):
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    parts = []
    if numeric:
        parts.append(("num", make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numeric))
    if categorical:
        parts.append(("cat", make_pipeline(SimpleImputer(strategy="most_frequent"),
                                           OneHotEncoder(handle_unknown="ignore")), categorical))
    return make_pipeline(ColumnTransformer(parts), LogisticRegression(C=1.0, max_iter=2000))


def confound_predictions(table: Mapping[str, Sequence], y, folds, numeric: Sequence[str]) -> np.ndarray:
    """Out-of-fold P(positive) of a logistic regression on the columns of ``table`` alone.

    ``numeric`` names the numeric columns (standardised, median-imputed); the
    others are one-hot encoded (most frequent value imputed; a level unseen in
    training, e.g. a left-out site, contributes nothing).
    """
    names = list(table)
    X = np.empty((len(y), len(names)), dtype=object)
    for j, c in enumerate(names):
        vals = table[c]
        X[:, j] = [np.nan if v is None else (float(v) if c in numeric else str(v)) for v in vals]
    num = [j for j, c in enumerate(names) if c in numeric]
    cat = [j for j, c in enumerate(names) if c not in numeric]
    return oof_scores(X, y, folds, lambda: _confound_model(num, cat))


def score_vs_confound(score, values, numeric: bool, y=None) -> dict:
    """Numeric: Spearman correlation with the score; categorical: the score's AUC within each level."""
    from scipy.stats import spearmanr

    score = np.asarray(score, float)
    if numeric:
        v = np.array([np.nan if x is None else float(x) for x in values])
        ok = np.isfinite(v)
        if ok.sum() < 3 or np.ptp(v[ok]) == 0:
            return {"spearman_r": None, "p_value": None, "n": int(ok.sum())}
        r, p = spearmanr(score[ok], v[ok])
        return {"spearman_r": float(r), "p_value": float(p), "n": int(ok.sum())}
    y = np.asarray(y, int)
    levels = {}
    for lev in sorted({str(x) for x in values if x is not None}):
        m = np.array([str(x) == lev for x in values])
        levels[lev] = {"n": int(m.sum()), "auc": _nan_none(auc_rows(y[m], score[m])[0]),
                       "mean_score": float(score[m].mean())}
    return {"levels": levels}


def _nan_none(v):
    return None if v is None or not np.isfinite(v) else float(v)

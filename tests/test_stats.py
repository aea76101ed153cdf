"""learn/stats.py against scikit-learn and SciPy (known truth), all on small arrays (< 5 s in total)."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve

from bids_adhd.learn import stats


def _data(n=40, shift=1.0, seed=0):
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * (n // 2))
    score = rng.normal(size=n) + shift * y
    return y, stats.sigmoid(score)


def test_auc_rows_equals_sklearn_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=(30, 25))
    s = np.round(rng.normal(size=(30, 25)), 1)           # many ties
    ours = stats.auc_rows(y, s)
    for row_y, row_s, v in zip(y, s, ours):
        assert v == pytest.approx(roc_auc_score(row_y, row_s), abs=1e-12)
    assert np.isnan(stats.auc_rows(np.zeros(5, int), np.arange(5.0))[0])


def test_bootstrap_ci_matches_scipy_percentile_bootstrap():
    from scipy.stats import bootstrap

    y, p = _data(40, 1.0)
    ours = stats.bootstrap_cis(y, p, (p >= 0.5).astype(int), n_boot=1500, seed=3)
    ref = bootstrap((y, p), lambda a, b: roc_auc_score(a, b), paired=True, vectorized=False,
                    n_resamples=1500, method="percentile", random_state=0).confidence_interval
    assert ours["auc"][0] == pytest.approx(ref.low, abs=0.05)
    assert ours["auc"][1] == pytest.approx(ref.high, abs=0.05)
    point = roc_auc_score(y, p)
    assert ours["auc"][0] < point < ours["auc"][1]
    assert ours["brier"][0] < brier_score_loss(y, p) < ours["brier"][1]
    # a seeded bootstrap is reproducible; another seed differs
    assert stats.bootstrap_cis(y, p, p >= 0.5, 200, seed=3) == stats.bootstrap_cis(y, p, p >= 0.5, 200, seed=3)
    assert stats.bootstrap_cis(y, p, p >= 0.5, 200, seed=4) != stats.bootstrap_cis(y, p, p >= 0.5, 200, seed=3)


def test_resamples_always_hold_both_classes():
    y = np.array([1] + [0] * 9)                          # one positive: many one-class draws
    idx = stats.resample_indices(y, 500, 0)
    assert (y[idx].max(axis=1) == 1).all() and (y[idx].min(axis=1) == 0).all()


def test_permutation_p_value_is_sklearns():
    from sklearn.linear_model import RidgeClassifier
    from sklearn.model_selection import StratifiedKFold, permutation_test_score

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 15)
    X = rng.normal(size=(30, 3)) + 0.8 * y[:, None]
    score, null, p = permutation_test_score(RidgeClassifier(), X, y, cv=StratifiedKFold(3), n_permutations=30,
                                            scoring="roc_auc", random_state=0)
    assert stats.permutation_p_value(score, null) == pytest.approx(p)
    assert stats.permutation_p_value(10.0, null) == pytest.approx(1 / 31)      # never 0
    assert stats.permutation_p_value(-10.0, null) == 1.0


def test_ridge_scores_are_sklearns_ridge_classifier_and_linear_in_the_labels():
    from sklearn.linear_model import RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(3)
    y = np.array([0, 1] * 10)
    folds = (np.arange(20) // 2) % 4
    X = rng.normal(size=(20, 30)) + 0.5 * y[:, None]
    ours = stats.ridge_oof_scores(X, y, folds, alpha=7.0)
    for k in range(4):
        te = folds == k
        ref = make_pipeline(StandardScaler(), RidgeClassifier(alpha=7.0)).fit(X[~te], y[~te])
        assert np.allclose(ours[te], ref.decision_function(X[te]), atol=1e-8)
    perms = np.stack([rng.permutation(y) for _ in range(3)], axis=1)
    both = stats.ridge_oof_scores(X, perms, folds, alpha=7.0)
    assert np.allclose(both[:, 1], stats.ridge_oof_scores(X, perms[:, 1], folds, alpha=7.0))


def test_permutations_keep_every_folds_class_counts():
    y = np.array([0, 1] * 10)
    folds = (np.arange(20) // 2) % 4
    rng = np.random.default_rng(0)
    for _ in range(20):
        z = stats.permute_within_folds(y, folds, rng)
        assert all(z[folds == k].sum() == y[folds == k].sum() for k in range(4))
    assert any((stats.permute_within_folds(y, folds, rng) != y).any() for _ in range(3))


def test_permutation_null_is_near_chance_and_signal_is_not():
    rng = np.random.default_rng(2)
    y = np.array([0, 1] * 12)
    folds = (np.arange(24) // 2) % 4
    X = rng.normal(size=(24, 5)) + 1.2 * y[:, None]
    observed = stats.frozen_feature_auc(X, y, folds)
    null = stats.permutation_null(X, y, folds, 500, seed=0)
    assert observed > 0.85 and null.shape == (500,)
    assert abs(np.median(null) - 0.5) < 0.1
    assert stats.permutation_p_value(observed, null) <= 2 / 501
    p_noise = [stats.permutation_p_value(stats.frozen_feature_auc(nz, y, folds),
                                         stats.permutation_null(nz, y, folds, 200, seed=s))
               for s, nz in enumerate(rng.normal(size=(40, 24, 5)))]
    # no signal: p roughly uniform, ~5 % below 0.05 (40 datasets: at most 8 by chance, P < 0.01)
    assert np.mean(np.array(p_noise) < 0.05) <= 0.2 and 0.3 < np.mean(p_noise) < 0.7


def test_platt_map_without_data_is_identity_and_with_many_is_sklearns_platt():
    from sklearn.linear_model import LogisticRegression

    ident = stats.fit_platt([], [])
    assert ident["slope"] == pytest.approx(1) and ident["intercept"] == pytest.approx(0)
    p = np.array([0.2, 0.7, 0.9])
    assert np.allclose(stats.apply_platt(p, ident), p)
    y, p = _data(4000, 1.0, seed=5)
    p = stats.sigmoid(3 * stats.logit(p) + 1.0)          # badly over-confident and shifted scores
    ours = stats.fit_platt(p, y, prior_sd=1.0)
    ref = LogisticRegression(C=1e6).fit(stats.logit(p)[:, None], y)
    assert ours["slope"] == pytest.approx(ref.coef_[0, 0], rel=0.02)
    assert ours["intercept"] == pytest.approx(ref.intercept_[0], abs=0.03)
    assert brier_score_loss(y, stats.apply_platt(p, ours)) < brier_score_loss(y, p)


def test_platt_prior_keeps_few_subjects_near_identity():
    few = stats.fit_platt([0.3, 0.8, 0.6], [0, 1, 1], prior_sd=0.5)
    assert abs(few["slope"] - 1) < 0.5 and abs(few["intercept"]) < 0.5
    loose = stats.fit_platt([0.3, 0.8, 0.6], [0, 1, 1], prior_sd=100.0)
    assert loose["slope"] > few["slope"] + 1              # nearly separable: the loose fit runs away


def test_youden_threshold_maximises_sklearns_tpr_minus_fpr():
    y, p = _data(30, 1.0, seed=7)
    t = stats.youden_threshold(y, p)
    fpr, tpr, _ = roc_curve(y, p)
    pred = p >= t
    j = pred[y == 1].mean() - pred[y == 0].mean()
    assert j == pytest.approx((tpr - fpr).max())
    assert stats.youden_threshold([1, 1], [0.2, 0.3]) == 0.5
    # separable: a whole interval is optimal; the midpoint closest to 0.5 is taken
    assert stats.youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 0.5
    assert stats.youden_threshold([0, 0, 1, 1], [0.6, 0.7, 0.8, 0.9]) == pytest.approx(0.75)


def test_reliability_bins_are_sklearns_calibration_curve():
    from sklearn.calibration import calibration_curve

    y, p = _data(200, 1.0, seed=9)
    rel = stats.reliability(y, p, n_bins=5)
    frac, mean = calibration_curve(y, p, n_bins=5)
    assert np.allclose(rel["fraction_positive"], frac) and np.allclose(rel["mean_predicted"], mean)
    assert sum(rel["count"]) == 200 and len(rel["count"]) == len(frac)


def test_confound_predictions_find_a_confounded_motion_and_ignore_noise():
    rng = np.random.default_rng(4)
    y = np.array([0, 1] * 20)
    folds = np.arange(40) % 5
    fd = 0.2 + 0.3 * y + rng.normal(0, 0.1, 40)
    table = {"mean_fd": list(fd), "site": list(rng.choice(["A", "B"], 40)), "age": [None] + list(rng.uniform(7, 17, 39))}
    p = stats.confound_predictions({"mean_fd": table["mean_fd"]}, y, folds, numeric=["mean_fd"])
    assert roc_auc_score(y, p) > 0.85
    p_all = stats.confound_predictions(table, y, folds, numeric=["mean_fd", "age"])
    assert roc_auc_score(y, p_all) > 0.8 and np.isfinite(p_all).all()
    p_site = stats.confound_predictions({"site": table["site"]}, y, folds, numeric=[])
    assert roc_auc_score(y, p_site) < 0.8


def test_score_vs_confound():
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 10)
    score = rng.normal(size=20) + y
    num = stats.score_vs_confound(score, list(2 * score + rng.normal(0, 0.1, 20)), True)
    assert num["spearman_r"] > 0.9 and num["n"] == 20
    site = ["A", "A", "B", "B"] * 5
    cat = stats.score_vs_confound(score, site, False, y)
    assert set(cat["levels"]) == {"A", "B"}
    m = np.array(site) == "A"
    assert cat["levels"]["A"]["auc"] == pytest.approx(roc_auc_score(y[m], score[m]))

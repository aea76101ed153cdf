"""--harmonize combat (bids_adhd.learn.harmonize): ComBat fitted on each training fold only.

Known truth: features with a planted additive and multiplicative site effect;
after harmonisation the held-out subjects' site means agree. The fit never
sees a test subject: combatlearn's own ``fit`` is spied on, and changing the
test subjects' values changes neither the fit nor the training rows' output.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("combatlearn")

from bids_adhd.errors import DataError, UsageError  # noqa: E402
from bids_adhd.learn import harmonize, stats  # noqa: E402


def _sited(n=40, f=12, seed=0):
    """(features, sites, covariates): at site B every feature's error is shifted by +3 and scaled by 2;
    age adds a true (biological) linear trend, the same at both sites, that the harmonisation must keep."""
    rng = np.random.default_rng(seed)
    sites = np.array(["A", "B"] * (n // 2))
    age = rng.uniform(8, 16, n)
    sex = rng.choice(["F", "M"], n)
    eps = rng.normal(0, 1, (n, f))
    b = (sites == "B")[:, None]
    x = 0.3 * (age[:, None] - 12) + np.where(b, 3.0 + 2.0 * eps, eps)     # ComBat's model: y = Xβ + γ + δε
    return x, sites, {"age": list(age), "sex": list(sex)}


def test_site_effect_removed_on_held_out_rows_and_age_kept():
    x, sites, cov = _sited(n=120)
    test = np.zeros(len(x), bool)
    test[::5] = True                                  # 24 held-out rows, 12 per site
    out, _ = harmonize.combat_fit_transform(x, sites, cov, ~test)

    def gap(z):                                       # held-out site-mean difference in SD units (noise ~0.3)
        return np.mean(np.abs(z[test & (sites == "B")].mean(0) - z[test & (sites == "A")].mean(0)) / z.std(0))

    def sd_ratio(z):
        return (z[~test & (sites == "B")].std(0) / z[~test & (sites == "A")].std(0)).mean()

    assert gap(x) > 1.0 and gap(out) < 0.6, (gap(x), gap(out))
    assert sd_ratio(x) > 1.5 and 0.75 < sd_ratio(out) < 1.33
    age = np.asarray(cov["age"])
    r = np.mean([np.corrcoef(age, out[:, j])[0, 1] for j in range(out.shape[1])])
    assert r > 0.3                                    # the protected covariate's effect survives


def test_fit_sees_only_training_rows(monkeypatch):
    import combatlearn

    seen = []
    orig = combatlearn.ComBat.fit

    def spy(self, X, y=None):
        seen.append(list(X.index))
        return orig(self, X, y)

    monkeypatch.setattr(combatlearn.ComBat, "fit", spy)
    x, sites, cov = _sited()
    folds = np.arange(len(x)) % 4
    per_fold = harmonize.fold_features(x, sites, cov, folds)
    assert sorted(per_fold) == [0, 1, 2, 3] and len(seen) == 4
    for k, idx in zip(sorted(per_fold), seen):
        assert sorted(idx) == sorted(np.flatnonzero(folds != k).tolist())


def test_changing_test_subjects_changes_neither_fit_nor_training_rows():
    x, sites, cov = _sited(seed=3)
    test = np.arange(len(x)) % 5 == 0
    out1, m1 = harmonize.combat_fit_transform(x, sites, cov, ~test)
    x2 = x.copy()
    x2[test] = np.random.default_rng(9).normal(50, 10, x2[test].shape)    # wild test values
    out2, m2 = harmonize.combat_fit_transform(x2, sites, cov, ~test)
    np.testing.assert_allclose(out1[~test], out2[~test], rtol=0, atol=1e-10)
    assert not np.allclose(out1[test], out2[test])
    # and the test rows are transformed row by row: the same value gives the same output in both fits
    np.testing.assert_allclose(out1[test], np.asarray(m2.transform(_frame(x, test)), float), atol=1e-10)


def _frame(x, rows):
    import pandas as pd

    idx = pd.RangeIndex(len(x))
    return pd.DataFrame(x[rows], index=idx[rows])


def test_ridge_accepts_per_fold_features():
    x, sites, cov = _sited(seed=5)
    y = np.random.default_rng(1).integers(0, 2, len(x))
    folds = np.arange(len(x)) % 4
    same = {k: x for k in range(4)}
    np.testing.assert_allclose(stats.ridge_oof_scores(same, y, folds), stats.ridge_oof_scores(x, y, folds))
    per_fold = harmonize.fold_features(x, sites, cov, folds)
    null = stats.permutation_null(per_fold, y, folds, 20, 0)
    assert null.shape == (20,) and np.all((null >= 0) & (null <= 1))


def test_refusals_are_one_line_errors():
    sites = {f"s{i}": "AB"[i % 2] for i in range(8)}
    folds = {s: i % 4 for i, s in enumerate(sites)}          # fold k: s_k, s_{k+4}
    harmonize.check_harmonize("none", "site", sites, folds)   # nothing to check
    with pytest.raises(UsageError, match="--cv site"):
        harmonize.check_harmonize("combat", "site", sites, folds)
    harmonize.check_harmonize("combat", "stratified", sites, folds)   # 3 per site in each training fold
    few = dict(sites, s0="C", s4="C")                                  # site C: fold 0 only
    with pytest.raises(DataError, match="training subjects do not include"):
        harmonize.check_harmonize("combat", "stratified", few, folds)
    one = dict(sites, s0="C", s1="C")                                   # site C: 1 training subject in folds 0, 1
    with pytest.raises(DataError, match="fewer than 2 training subjects"):
        harmonize.check_harmonize("combat", "stratified", one, folds)
    with pytest.raises(DataError, match="two sites"):
        harmonize.check_harmonize("combat", "stratified", {s: "A" for s in sites}, folds)


def test_protected_covariates_need_every_subject():
    rows = {"a": {"age": "10", "sex": "F"}, "b": {"age": "n/a", "sex": "M"}}
    assert harmonize.protected_covariates(rows, ["a", "b"]) == {"sex": ["F", "M"]}


def test_group_level_with_harmonize_combat(tmp_path, monkeypatch):
    """Through the command line (tiny stand-in model): metrics.json says what was harmonised, the
    permutation test ran on the harmonised features; --cv site with it exits 64 before any training."""
    import json

    from bids_adhd.cli import main
    from test_group_common import GROUP_ARGS, patch_tiny, synthetic, tiny_pipeline

    bids, out, rows = synthetic(tmp_path, n=12, seed=4)
    patch_tiny(monkeypatch)
    base = [str(bids), str(out), "group", "--pipeline", str(tiny_pipeline(tmp_path, epochs=1, head_epochs=2)), "--confounds", "none",
            "--no-saliency", "-q", *GROUP_ARGS]
    assert main(base + ["--cv", "site", "--harmonize", "combat"]) == 64
    assert not (out / "group" / "metrics.json").exists()
    assert main(base + ["--harmonize", "combat", "--permutations", "20"]) == 0
    m = json.loads((out / "group" / "metrics.json").read_text())
    h = m["harmonization"]
    assert h["method"] == "combat" and h["batch"] == "site" and h["protected_covariates"] == ["age", "sex"]
    assert h["library"].startswith("combatlearn ")
    assert m["permutation"]["n"] == 20 and 0 < m["permutation"]["p_value"] <= 1
    assert "Site harmonisation" in (out / "group" / "report.html").read_text()

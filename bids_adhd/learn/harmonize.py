"""Optional ComBat harmonisation of the frozen features, fitted on each training fold only.

``--harmonize combat`` removes the site effect (site as batch; ``age`` and ``sex``
protected as covariates) from the encoder's pooled features as built, the
input of the permutation test's read-out (:func:`bids_adhd.learn.groupstats.permutation_test`).
For each fold, ComBat (Fortin et al. 2018, "neuroComBat") is fitted on that fold's
training subjects only and applied to all subjects, so a test subject's values
never enter the fit; the labels are not used, so the within-fold label
permutations stay exchangeable. The fine-tuned model's input maps are not
harmonised (see docs/group.md).

The implementation is the maintained combatlearn package (MIT; scikit-learn
``fit``/``transform``; the ``harmonize`` extra), not code of our own.
neuroHarmonize 2.5.2 needs numpy<2 and pandas<3 and neuroCombat 0.2.12 has no
fit-then-apply path, hence combatlearn.

A test site must be one the fit has seen (ComBat has no parameters for an
unseen site, so ``--cv site`` is refused) and every training site needs at
least two subjects (a site variance).
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

import numpy as np

from ..errors import DataError, UsageError
from ..settings import HARMONIZE_METHODS as METHODS
#: participants.tsv columns protected (kept) by the harmonisation when present for every subject
PROTECT = ("age", "sex")
MIN_PER_SITE = 2


def require_combatlearn():
    try:
        import combatlearn
    except ImportError:
        raise UsageError("--harmonize combat needs the combatlearn package: pip install "
                         "'bids_adhd[harmonize]'") from None
    return combatlearn


def check_harmonize(method: str, cv: str, sites: Mapping[str, object], assignment: Mapping[str, int]) -> None:
    """Refuse, before any training, what ComBat cannot do with these folds (one-line errors)."""
    if method == "none":
        return
    if method not in METHODS:
        raise UsageError(f"--harmonize must be one of {', '.join(METHODS)} (got {method!r})")
    if cv == "site":
        raise UsageError("--harmonize combat cannot be combined with --cv site: each test fold is a site the "
                         "training folds never saw, and ComBat has no parameters for an unseen site")
    require_combatlearn()
    if any(sites.get(s) is None for s in assignment):
        raise DataError("--harmonize combat needs a 'site' for every subject in participants.tsv")
    if len({sites[s] for s in assignment}) < 2:
        raise DataError("--harmonize combat needs at least two sites (participants.tsv 'site'); there is one")
    for k in sorted(set(assignment.values())):
        train = Counter(sites[s] for s, f in assignment.items() if f != k)
        unseen = sorted({str(sites[s]) for s, f in assignment.items() if f == k} - {str(x) for x in train})
        if unseen:
            raise DataError(f"--harmonize combat: fold {k + 1} tests site(s) {', '.join(unseen)} that its "
                            "training subjects do not include; ComBat cannot harmonise an unseen site")
        few = sorted(str(x) for x, n in train.items() if n < MIN_PER_SITE)
        if few:
            raise DataError(f"--harmonize combat: in fold {k + 1} site(s) {', '.join(few)} have fewer than "
                            f"{MIN_PER_SITE} training subjects; ComBat needs a variance per site")


def _covariate_frames(covariates: Mapping[str, Sequence], index):
    """(discrete, continuous) DataFrames (or None): numeric columns are continuous."""
    import pandas as pd

    disc, cont = {}, {}
    for name, vals in covariates.items():
        try:
            cont[name] = [float(v) for v in vals]
        except (TypeError, ValueError):
            disc[name] = [str(v) for v in vals]
    return (pd.DataFrame(disc, index=index) if disc else None,
            pd.DataFrame(cont, index=index) if cont else None)


def combat_fit_transform(features: np.ndarray, sites: Sequence, covariates: Mapping[str, Sequence],
                         train: np.ndarray) -> tuple[np.ndarray, object]:
    """(all rows harmonised, the fitted combatlearn ComBat): fitted on the rows where ``train`` is True only."""
    import pandas as pd

    combat = require_combatlearn().ComBat
    X = np.asarray(features, float)
    train = np.asarray(train, bool)
    idx = pd.RangeIndex(len(X))
    disc, cont = _covariate_frames(covariates, idx)
    model = combat(batch=pd.Series([str(s) for s in sites], index=idx), discrete_covariates=disc,
                   continuous_covariates=cont, method="fortin")
    model.fit(pd.DataFrame(X[train], index=idx[train]))
    out = model.transform(pd.DataFrame(X, index=idx))
    return np.asarray(out, float), model


def protected_covariates(rows: Mapping[str, Mapping], subjects: Sequence[str]) -> dict[str, list]:
    """The :data:`PROTECT` columns present (not empty) for every subject: column → values."""
    out = {}
    for c in PROTECT:
        vals = [(rows.get(s) or {}).get(c) for s in subjects]
        if all(v not in (None, "", "n/a") for v in vals):
            out[c] = vals
    return out


def fold_features(features: np.ndarray, sites: Sequence, covariates: Mapping[str, Sequence],
                  folds: Sequence[int]) -> dict:
    """fold → (N, F) features harmonised by the ComBat fitted on that fold's training rows only
    (the input :func:`bids_adhd.learn.stats.ridge_oof_scores` takes per fold)."""
    folds = np.asarray(folds)
    return {k: combat_fit_transform(features, sites, covariates, folds != k)[0] for k in np.unique(folds)}


def describe(covariates: Mapping[str, Sequence]) -> dict:
    """``metrics.json["harmonization"]``: what was harmonised, how, and what was not."""
    import combatlearn

    return {"method": "combat", "library": f"combatlearn {combatlearn.__version__}",
            "variant": "Fortin et al. 2018 (neuroComBat), parametric empirical Bayes",
            "batch": "site", "protected_covariates": list(covariates),
            "fitted_on": "the training subjects of each fold only; applied to that fold's training and test "
                         "subjects (the labels are not used)",
            "applies_to": "the frozen-feature read-out of the permutation test; the fine-tuned model's input "
                          "maps are not harmonised"}


def harmonized_features(features: np.ndarray, inputs, folds: Sequence[int]) -> tuple[dict, dict]:
    """(fold → harmonised features, ``metrics.json["harmonization"]``) for the group level's subjects."""
    import time

    t0 = time.perf_counter()
    subjects = inputs.subjects
    cov = protected_covariates(inputs.covariates, subjects)
    out = fold_features(features, [inputs.sites[s] for s in subjects], cov, folds)
    info = describe(cov)
    info["seconds"] = time.perf_counter() - t0
    return out, info

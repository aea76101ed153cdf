"""Subject-level stratified k-fold (the ClinicaDL design) or leave-one-site-out cross-validation.

* The unit is the SUBJECT: all sessions and runs of one subject land in the
  same fold, so no subject is ever both trained on and tested on.
* Folds are stratified by the label (scikit-learn ``StratifiedKFold`` with
  ``shuffle=True`` and the run's seed); with ``TrainConfig.stratify_site``
  by label × site when every label × site cell has at least ``folds``
  subjects (otherwise by label alone, with a warning).
* Inside each training fold an inner validation split (stratified,
  ``inner_val_fraction`` of the subjects, at least one per class) drives
  early stopping; the test fold is never looked at until the fold's model is
  final.
* ``--cv site`` (:func:`assign_site_folds`): leave-one-site-out, one fold per
  site (scikit-learn ``LeaveOneGroupOut``); the number of folds is the number
  of sites.
* The assignment is written to ``group/folds.tsv`` before any training and
  is reused as is by ``--resume``.
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import derivatives as dv
from ..errors import DataError, UsageError

LOG = logging.getLogger("bids_adhd.group")


def check_class_counts(labels: Sequence[int], folds: int, class_names: Sequence[str], column: str) -> None:
    """Two classes present, each with at least ``folds`` subjects (else ``DataError``, exit 65)."""
    counts = Counter(int(v) for v in labels)
    present = [c for c in (0, 1) if counts.get(c, 0)]
    if len(present) < 2:
        only = class_names[present[0]] if present else "none"
        raise DataError(f"participants.tsv column {column!r} gives one class only among the subjects with maps "
                        f"({only}: {counts.get(present[0], 0) if present else 0}); the classifier needs both "
                        f"{class_names[1]!r} and other subjects")
    small = [f"{class_names[c]}: {counts[c]}" for c in (0, 1) if counts[c] < folds]
    if small:
        raise DataError(f"too few subjects per class for {folds}-fold cross-validation ({', '.join(small)}; "
                        f"each class needs at least {folds}); lower --folds (at least 2) or add subjects")


def assign_folds(subjects: Sequence[str], labels: Sequence[int], folds: int, seed: int,
                 sites: Sequence[str | None] | None = None) -> dict[str, int]:
    """Subject → fold index (0-based), stratified by label (and site), reproducible from ``seed``."""
    from sklearn.model_selection import StratifiedKFold

    subjects = list(subjects)
    y = np.asarray(labels, int)
    strata = [str(v) for v in y]
    if sites is not None:
        combo = [f"{v}|{s}" for v, s in zip(y, sites)]
        counts = Counter(combo)
        rare = sorted(k for k, n in counts.items() if n < folds)
        if rare:
            LOG.warning("stratify_site: label|site cell(s) %s have fewer than %d subjects; stratifying by "
                        "label only", ", ".join(rare), folds)
        else:
            strata = combo
    order = np.argsort(subjects)                       # independent of the input order
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=int(seed))
    out: dict[str, int] = {}
    strata_arr = np.asarray(strata)[order]
    for k, (_, test) in enumerate(skf.split(np.zeros(len(order)), strata_arr)):
        for i in test:
            out[subjects[order[i]]] = k
    return out


def assign_site_folds(subjects: Sequence[str], labels: Sequence[int], sites: Sequence[str | None],
                      class_names: Sequence[str] = ("0", "1")) -> dict[str, int]:
    """Leave-one-site-out (``--cv site``): subject → index of its site among the sorted sites.

    Every subject needs a site (participants.tsv column ``site``), there must be
    at least two sites, and every training set (all sites but one) must hold
    both classes; otherwise ``DataError`` (65).
    """
    from sklearn.model_selection import LeaveOneGroupOut

    subjects = list(subjects)
    missing = [s for s, v in zip(subjects, sites) if v in (None, "", "n/a")]
    if missing:
        raise DataError(f"--cv site: no site in participants.tsv for {', '.join('sub-' + s for s in missing[:5])}; "
                        "fill the 'site' column or use --cv stratified")
    groups = np.asarray([str(v) for v in sites])
    names = sorted(set(groups))
    if len(names) < 2:
        raise DataError(f"--cv site needs at least two sites (participants.tsv 'site': {', '.join(names)}); "
                        "use --cv stratified")
    y = np.asarray(labels, int)
    out: dict[str, int] = {}
    for _, test in LeaveOneGroupOut().split(np.zeros(len(y)), y, groups):
        site = groups[test[0]]
        train = groups != site
        if len(np.unique(y[train])) < 2:
            raise DataError(f"--cv site: without site {site} only {class_names[int(y[train][0])]!r} subjects "
                            "are left to train on; use --cv stratified")
        for i in test:
            out[subjects[i]] = names.index(site)
    return out


def inner_split(subjects: Sequence[str], labels: Sequence[int], fraction: float, seed: int
                ) -> tuple[list[str], list[str]]:
    """(train, validation) subjects, stratified, validation ≥ 1 per class when possible."""
    subjects = list(subjects)
    y = np.asarray(labels, int)
    rng = np.random.default_rng([int(seed), 101])
    n_val = max(2, int(round(fraction * len(subjects))))
    if fraction <= 0 or len(subjects) < 4:
        return sorted(subjects), []
    val: list[str] = []
    classes = [c for c in (0, 1) if (y == c).any()]
    # proportional allocation, at least one per class, never the whole class
    for c in classes:
        members = sorted(s for s, v in zip(subjects, y) if v == c)
        k = max(1, int(round(n_val * len(members) / len(subjects))))
        k = min(k, len(members) - 1)
        if k > 0:
            val += list(rng.choice(members, size=k, replace=False))
    train = sorted(s for s in subjects if s not in set(val))
    return train, sorted(val)


# --- folds.tsv -----------------------------------------------------------------

def write_folds(path: Path, assignment: dict[str, int], labels: dict[str, int], class_names) -> Path:
    subs = sorted(assignment)
    return dv.write_tsv(path, {"participant_id": [f"sub-{s}" for s in subs],
                               "fold": [assignment[s] + 1 for s in subs],
                               "label": [class_names[labels[s]] for s in subs]})


def read_folds(path: Path, class_names) -> tuple[dict[str, int], dict[str, int]]:
    lines = [ln.split("\t") for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines or lines[0][:3] != ["participant_id", "fold", "label"]:
        raise DataError(f"{path} is not a folds table written by bids_adhd; remove OUTPUT_DIR/group and "
                        "run without --resume")
    assignment, labels = {}, {}
    for row in lines[1:]:
        sub = row[0][4:] if row[0].startswith("sub-") else row[0]
        assignment[sub] = int(row[1]) - 1
        labels[sub] = list(class_names).index(row[2]) if row[2] in class_names else -1
    return assignment, labels


def check_resume_folds(saved: dict[str, int], saved_labels: dict[str, int], labels: dict[str, int],
                       folds: int) -> None:
    """The saved assignment must cover exactly the same subjects with the same labels."""
    if set(saved) != set(labels):
        extra = sorted(set(labels) - set(saved))
        gone = sorted(set(saved) - set(labels))
        raise UsageError("--resume: the subjects differ from the interrupted run's "
                         f"(new: {', '.join(extra[:5]) or 'none'}; gone: {', '.join(gone[:5]) or 'none'}); "
                         "run without --resume to start over")
    changed = sorted(s for s in labels if saved_labels.get(s) != labels[s])
    if changed:
        raise UsageError(f"--resume: labels changed for {', '.join('sub-' + s for s in changed[:5])}; "
                         "run without --resume to start over")
    if max(saved.values()) + 1 != folds:
        raise UsageError(f"--resume: the interrupted run used {max(saved.values()) + 1} folds, not {folds}; "
                         "pass the same --folds or run without --resume")

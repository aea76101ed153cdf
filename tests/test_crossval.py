"""Subject-level stratified folds, inner split, class-count checks."""
import pytest

from bids_adhd.errors import DataError, UsageError
from bids_adhd.learn.crossval import (assign_folds, check_class_counts, check_resume_folds, inner_split,
                                      read_folds, write_folds)


def _subjects(n=20):
    subs = [f"{i:02d}" for i in range(1, n + 1)]
    labels = [i % 2 for i in range(n)]
    return subs, labels


def test_folds_stratified_reproducible_and_order_independent():
    subs, labels = _subjects()
    a = assign_folds(subs, labels, 5, seed=3)
    assert sorted(a) == subs and set(a.values()) == set(range(5))
    for k in range(5):
        members = [s for s in subs if a[s] == k]
        assert len(members) == 4
        assert sum(labels[subs.index(s)] for s in members) == 2          # 2 per class per fold
    assert assign_folds(subs, labels, 5, seed=3) == a
    assert assign_folds(subs[::-1], labels[::-1], 5, seed=3) == a       # input order does not matter
    assert assign_folds(subs, labels, 5, seed=4) != a


def test_site_stratification_falls_back_for_small_cells():
    subs, labels = _subjects(20)
    sites = ["A"] * 18 + ["B"] * 2
    a = assign_folds(subs, labels, 5, seed=0, sites=sites)
    assert sorted(a) == subs


def test_inner_split_has_both_classes():
    subs, labels = _subjects(16)
    tr, va = inner_split(subs, labels, 0.2, seed=1)
    assert set(tr) | set(va) == set(subs) and not set(tr) & set(va)
    assert {labels[subs.index(s)] for s in va} == {0, 1}
    assert inner_split(subs, labels, 0.2, seed=1) == (tr, va)


def test_class_count_errors():
    names = ("TD", "ADHD")
    with pytest.raises(DataError, match="one class only"):
        check_class_counts([1, 1, 1], 2, names, "diagnosis")
    with pytest.raises(DataError, match="lower --folds"):
        check_class_counts([0, 0, 0, 0, 0, 1, 1, 1], 5, names, "diagnosis")
    check_class_counts([0, 1] * 5, 5, names, "diagnosis")


def test_folds_file_roundtrip_and_resume_checks(tmp_path):
    subs, labels = _subjects(10)
    a = assign_folds(subs, labels, 2, seed=0)
    lab = dict(zip(subs, labels))
    write_folds(tmp_path / "folds.tsv", a, lab, ("TD", "ADHD"))
    a2, l2 = read_folds(tmp_path / "folds.tsv", ("TD", "ADHD"))
    assert a2 == a and l2 == lab
    check_resume_folds(a2, l2, lab, 2)
    with pytest.raises(UsageError, match="subjects differ"):
        check_resume_folds(a2, l2, {**lab, "99": 1}, 2)
    with pytest.raises(UsageError, match="folds"):
        check_resume_folds(a2, l2, lab, 3)


def test_leave_one_site_out():
    from bids_adhd.learn.crossval import assign_site_folds

    subs = [f"{i:02d}" for i in range(1, 13)]
    y = [0, 1] * 6
    sites = ["B", "A", "C"] * 4
    folds = assign_site_folds(subs, y, sites)
    assert {s: folds[s] for s in subs} == {s: "ABC".index(site) for s, site in zip(subs, sites)}
    with pytest.raises(DataError, match="at least two sites"):
        assign_site_folds(subs, y, ["A"] * 12)
    with pytest.raises(DataError, match="no site"):
        assign_site_folds(subs, y, [None] + ["A", "B"] * 5 + ["A"])
    with pytest.raises(DataError, match="only"):                   # site B holds every positive
        assign_site_folds(subs, y, ["A", "B"] * 6)

"""Binary metrics (scikit-learn) and their summary over folds."""
import math

import pytest

from bids_adhd.learn.metrics import binary_metrics, roc_points, summarise


def test_perfect_and_known_values():
    m = binary_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert m == {"accuracy": 1.0, "balanced_accuracy": 1.0, "auc": 1.0, "sensitivity": 1.0,
                 "specificity": 1.0, "f1": 1.0, "n": 4}
    # 3 positives, 1 missed; 3 negatives, 1 false positive
    m = binary_metrics([1, 1, 1, 0, 0, 0], [0.9, 0.7, 0.3, 0.6, 0.2, 0.1])
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["auc"] == pytest.approx(8 / 9)


def test_one_class_gives_no_auc():
    m = binary_metrics([1, 1], [0.2, 0.9])
    assert m["auc"] is None and m["specificity"] is None and m["sensitivity"] == 0.5
    assert roc_points([1, 1], [0.2, 0.9]) is None


def test_summary_mean_sd():
    folds = [{"accuracy": 0.5, "auc": 0.6}, {"accuracy": 1.0, "auc": None}]
    s = summarise(folds)
    assert s["accuracy"]["mean"] == 0.75 and s["accuracy"]["sd"] == pytest.approx(math.sqrt(0.125))
    assert s["auc"] == {"mean": 0.6, "sd": 0.0, "n_folds": 1}
    assert s["f1"]["mean"] is None

"""The pieces of the training loop (``bids_adhd.learn.train``): early stopping, the fold state a
checkpoint holds, the history log, one epoch, one validation. ``test_group_faults`` and
``test_group_resume`` check the whole loop (bit-for-bit reproducibility, kill and resume)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bids_adhd.learn.train import (EarlyStopping, FoldState, TrainingLog, _Fit, initial_state, load_checkpoint,
                                   save_checkpoint, train_epoch, validate)
from test_group_common import tiny_build_model
from test_group_faults import _cfg, _items


def test_early_stopping_keeps_the_best_and_counts_the_rest():
    s = EarlyStopping(patience=2)
    calls = []
    assert s.update(1.0, 1, lambda: calls.append(1) or "s1")
    assert not s.update(1.0 - 1e-7, 2, lambda: calls.append(2) or "s2")   # within min_delta: no gain
    assert (s.loss, s.epoch, s.state, s.bad, s.should_stop) == (1.0, 1, "s1", 1, False)
    assert s.update(0.5, 3, lambda: "s3") and s.bad == 0
    assert not s.update(0.7, 4, lambda: "s4") and not s.update(0.6, 5, lambda: "s5")
    assert (s.epoch, s.state, s.bad, s.should_stop) == (3, "s3", 2, True)
    assert calls == [1]                      # the state is copied only on a new best


def test_fold_state_round_trips_through_a_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    stopper = EarlyStopping(4, loss=0.25, epoch=2, state={"w": torch.arange(3.0)}, bad=1)
    fold = FoldState(4, epoch=3, head_done=True, history=[{"stage": "head", "epoch": 0}], stopper=stopper)
    path = tmp_path / "last.pt"
    save_checkpoint(path, fold.payload(model.state_dict(), 3, opt, sched))
    state = load_checkpoint(path)
    back = FoldState.from_payload(state, 4)
    assert (back.epoch, back.head_done, back.history) == (3, True, [{"stage": "head", "epoch": 0}])
    s = back.stopper
    assert (s.loss, s.epoch, s.bad, s.patience) == (0.25, 2, 1, 4) and torch.equal(s.state["w"], torch.arange(3.0))
    assert state["optimizer"]["state"][0]["step"] == 1 and state["scheduler"]["last_epoch"] == 1
    assert FoldState(4).payload({}, 0)["optimizer"] is None          # the head stage's checkpoint
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert load_checkpoint(tmp_path / "bad.pt") is None and load_checkpoint(tmp_path / "none.pt") is None


def test_training_log_writes_only_on_the_main_rank(tmp_path):
    rows = []
    log = TrainingLog(tmp_path / "main" / "log.tsv", rows, "fold-1", None, is_main=True)
    log.add({"stage": "head", "epoch": 0, "train_loss": 0.7, "lr": 0.01, "seconds": 1.0})
    log.add({"stage": "finetune", "epoch": 1, "train_loss": 0.6, "val_loss": 0.65, "lr": 0.001, "seconds": 2.0})
    log.write()
    lines = (tmp_path / "main" / "log.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["stage", "epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "lr",
                                    "seconds"]
    assert [ln.split("\t")[:2] for ln in lines[1:]] == [["head", "0"], ["finetune", "1"]]
    assert rows is log.rows and len(rows) == 2
    other = TrainingLog(tmp_path / "rank1" / "log.tsv", [], "fold-1", None, is_main=False)
    other.add({"stage": "finetune", "epoch": 1})
    other.write()
    other.close()
    assert not (tmp_path / "rank1").exists()


class _Bar:
    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k

    def set_postfix(self, **kw):
        pass


def _fit(cfg, train, val):
    torch.manual_seed(0)
    model, _ = tiny_build_model(cfg.model)
    init = initial_state(model)
    return _Fit(model, train, val, cfg, torch.device("cpu"), seed=3), init


def test_one_epoch_is_reproducible_and_trains(tmp_path):
    """One epoch from the same state gives the same bits (every random source is reseeded from
    (seed, epoch)); another epoch number shuffles differently; the trainable parameters move."""
    cfg = _cfg(batch_size=2, augment_flip=False, augment_affine=False)
    train, val = _items(5), _items(2, seed=1)
    fit, init = _fit(cfg, train, val)
    bar = _Bar()
    loss1 = train_epoch(fit, fit.model, 1, bar)
    after1 = {k: v.clone() for k, v in fit.model.state_dict().items()}
    assert bar.n == math.ceil(5 / 2) == fit.steps_per_epoch and math.isfinite(loss1)
    assert any(not torch.equal(after1[k], init[k]) for k in init)

    fit2, _ = _fit(cfg, train, val)
    assert train_epoch(fit2, fit2.model, 1, _Bar()) == loss1
    assert all(torch.equal(after1[k], v) for k, v in fit2.model.state_dict().items())
    fit3, _ = _fit(cfg, train, val)
    assert train_epoch(fit3, fit3.model, 2, _Bar()) != loss1


def test_validation_is_the_weighted_cross_entropy_of_the_predictions():
    from sklearn.metrics import log_loss, roc_auc_score

    from bids_adhd.learn.train import predict_proba
    from bids_adhd.learn.data import ItemImages

    cfg = _cfg()
    train, val = _items(4), _items(6, seed=2)
    fit, _ = _fit(cfg, train, val)
    got = validate(fit)
    p = predict_proba(fit.model, ItemImages(val), fit.device, fit.bs, None)
    y = np.array([it["label"] for it in val])
    w = fit.weights.numpy()[y]               # balanced train set: weights 1, 1
    assert got["val_loss"] == pytest.approx(log_loss(y, p, sample_weight=w), rel=1e-5)
    assert got["val_auc"] == pytest.approx(roc_auc_score(y, p))
    assert got["val_accuracy"] == pytest.approx(float(np.mean((p >= 0.5) == y)))


def test_recalibrate_norm_skips_a_batch_of_one():
    """An odd training set (5 subjects, batch 2) ends in a batch of one, which BatchNorm1d cannot take
    in train mode: the statistics are those of the other batches, exactly."""
    import torch
    from torch import nn

    from bids_adhd.learn.train import recalibrate_norm

    torch.manual_seed(0)
    x = torch.randn(5, 3)
    images = x.reshape(5, 1, 1, 1, 3)          # the loop's inputs are (N, C, X, Y, Z) volumes
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(3))
    recalibrate_norm(model, [images[0:2], images[2:4], images[4:5]], torch.device("cpu"))
    bn = model[1]
    # cumulative average of the two batch means / unbiased variances
    means = torch.stack([x[0:2].mean(0), x[2:4].mean(0)]).mean(0)
    vars_ = torch.stack([x[0:2].var(0), x[2:4].var(0)]).mean(0)
    assert torch.allclose(bn.running_mean, means, atol=1e-6)
    assert torch.allclose(bn.running_var, vars_, atol=1e-6)
    assert not model.training and bn.momentum == 0.1
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    recalibrate_norm(model, [images[4:5]], torch.device("cpu"))   # nothing usable: left as it was
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())

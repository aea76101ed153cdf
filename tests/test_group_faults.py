"""Group level under faults: training must be reproducible bit for bit, and a run SIGKILLed
at any of eight points then continued with ``--resume`` must end with exactly the outputs of
an uninterrupted run (docs/reliability.md, cases 74-84).

The in-process tests check the training loop (``train_model``) with a tiny classifier on
16^3 inputs; the kill chain runs real ``bids_adhd BIDS OUT group`` processes (the tiny
stand-in classifier of ``test_group_common``, on the maps ``write_synthetic_maps`` puts in
OUTPUT_DIR without running the participant level).
"""
from __future__ import annotations

import torch

from test_group_common import tiny_build_model


def _cfg(**train):
    from bids_adhd.config import load_pipeline

    cfg = load_pipeline("fast")
    t = dict(epochs=3, batch_size=2, head_epochs=0, augment_flip=True, augment_affine=True, patience=10,
             warmup_epochs=1)
    t.update(train)
    return cfg.replace("train", **t)


def _items(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"id": f"{i}", "subject": f"{i:02d}", "label": i % 2, "image": torch.rand(1, 16, 16, 16, generator=g)}
            for i in range(n)]


def _train(tmp_path, cfg, name, resume=False, train_set=None, val_set=None):
    from bids_adhd.learn.group import _augment
    from bids_adhd.learn.train import initial_state, train_model

    torch.manual_seed(cfg.train.seed)
    model, _ = tiny_build_model(cfg.model)
    res = train_model(model, initial_state(model), train_set or _items(4), val_set if val_set is not None
                      else _items(2, seed=1), cfg, torch.device("cpu"), ckpt_dir=tmp_path / "ckpt" / name,
                      log_path=tmp_path / name / "log.tsv", seed=7, resume=resume, progress=False,
                      augment=_augment(cfg), tb_dir=None)
    from bids_adhd.learn.classifier import adapter_state_dict
    return res, adapter_state_dict(model)


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_augmented_training_is_reproducible(tmp_path):
    """Two trainings with random flips and affine augmentation give the same bits.

    Was not so: MONAI's random transforms draw from their own numpy RandomState, which the
    per-epoch ``torch.manual_seed`` does not touch, and ``if augment`` (bool(Compose) ->
    len() -> flatten()) re-seeded the transforms from entropy before every sample."""
    cfg = _cfg()
    r1, s1 = _train(tmp_path, cfg, "a")
    r2, s2 = _train(tmp_path, cfg, "b")
    assert [h["train_loss"] for h in r1["history"]] == [h["train_loss"] for h in r2["history"]]
    _same_state(s1, s2)


def test_resume_after_early_stop_stays_stopped(tmp_path):
    """A fold killed after the checkpoint of the epoch that stopped it early (before its
    adapter and metrics were written) resumes as stopped: no further epoch is trained.

    lr 0 and frozen normalisation statistics: the validation loss never improves, so the
    run stops after 1 + patience epochs, long before ``epochs``."""
    cfg = _cfg(lr=0.0, norm_mode="frozen", patience=2, epochs=6, augment_flip=False, augment_affine=False)
    r1, s1 = _train(tmp_path, cfg, "a")
    assert r1["stopped_early"] and r1["epochs_run"] == 3
    assert (tmp_path / "ckpt" / "a" / "last.pt").is_file()      # as a kill would leave it
    r2, s2 = _train(tmp_path, cfg, "a", resume=True)
    assert (r2["epochs_run"], r2["stopped_early"], r2["best_epoch"]) == (3, True, r1["best_epoch"])
    assert r2["history"] == r1["history"]
    _same_state(s1, s2)

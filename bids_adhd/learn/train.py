"""Training one model (one cross-validation fold, or the final model).

The loop
--------
1. **Reset** the model to its initial adapter state (LoRA ``B = 0``, fresh head,
   the base's normalisation statistics): every fold starts from the same
   point, and the 78 M-parameter base is built once per run.
2. **Normalisation statistics** (``TrainConfig.norm_mode``):
   ``train`` (the paper preset) — BatchNorm in training mode, batch statistics,
   running averages with momentum 0.1, the standard fine-tuning recipe;
   ``recalibrate`` — the running statistics are re-estimated on this fold's
   training subjects (cumulative average over one pass, no gradient) and then
   kept fixed (BatchNorm in eval mode, its affine parameters still trainable):
   with batches of 4 the batch statistics of a randomly initialised or CT
   network are noisy, and train and eval would see different normalisations;
   ``frozen`` — the base's statistics in eval mode throughout.
3. **Head warm-up** (``TrainConfig.head_epochs`` > 0; linear probing then
   fine-tuning, "LP-FT", Kumar et al., ICLR 2022): the pooled features of the
   training and validation subjects are computed once with the (still
   unchanged) encoder and the head alone is trained on them, full batch, for
   up to ``head_epochs`` steps with early stopping on the validation loss. It
   costs one forward pass per subject and gives the LoRA stage a head that
   already points somewhere sensible, instead of random gradients flowing
   into the encoder.
4. **Fine-tuning** of every trainable parameter (LoRA, norm affine, head) for
   ``epochs`` epochs: AdamW (``lr``, ``weight_decay``), a per-step schedule of
   linear warm-up over ``warmup_epochs`` then cosine decay to 0, class
   balance by a weighted loss (``balance: loss``, weights ∝ 1/class
   frequency) or a weighted sampler, bf16/fp16 autocast on a GPU (fp32 on the
   CPU), early stopping after ``patience`` epochs without a lower validation
   loss; the best epoch's state is restored.

The pieces
----------
``train_model`` is a short loop over: ``_start_fold`` (reset or resume),
``_head_stage`` (stage 3), and per epoch ``train_epoch`` (reseeding, batches,
optimiser steps) and ``validate``; ``EarlyStopping`` keeps the best state (the
head warm-up's ``train_head`` uses it too, per step), ``FoldState`` is what a
checkpoint holds, ``TrainingLog`` the history TSV (and TensorBoard).

Checkpoints
-----------
After the head stage and after every epoch, ``<ckpt_dir>/last.pt`` is written
atomically (temp file + rename) with the trainable state, the normalisation
buffers, the optimiser and scheduler, the best state so far and the history.
It is read back with ``torch.load(weights_only=True)`` (no arbitrary
unpickling). Each epoch reseeds torch and the augmentation transforms (MONAI's
own numpy random state) from ``(seed, epoch)``, so a resumed fold replays the
same shuffles and augmentations as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import derivatives as dv
from ..errors import UsageError
from .data import ItemImages, batch_loader
from .distributed import current as current_dist, resolve_device  # noqa: F401 (train.resolve_device)

LOG = logging.getLogger("bids_adhd.group")


# --- device, precision ------------------------------------------------------------

def amp_dtype(device: torch.device, amp: str):
    """The autocast dtype, or None (CPU: always fp32)."""
    if device.type != "cuda" or amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16


def autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def memory_format(device: torch.device):
    """channels_last_3d: faster Conv3d with oneDNN on the CPU (``benchmarks/results/code_timings.md``); fine on CUDA."""
    return torch.channels_last_3d


def to_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device, non_blocking=True).contiguous(memory_format=memory_format(device))


# --- model state -----------------------------------------------------------------

def batchnorms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def initial_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a fold may change, as built: trainable parameters + normalisation buffers."""
    from .classifier import adapter_state_dict

    return adapter_state_dict(model)


def restore_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(state, strict=False)
    for bn in batchnorms(model):
        bn.momentum = 0.1


def set_mode(model: nn.Module, training: bool, norm_mode: str) -> None:
    """model.train()/eval(), with BatchNorm kept in eval mode unless it should learn statistics."""
    model.train(training)
    if training and (norm_mode in ("recalibrate", "frozen") or getattr(model, "freeze_norm_stats", False)):
        for bn in batchnorms(model):
            bn.eval()


@torch.no_grad()
def recalibrate_norm(model: nn.Module, batches, device) -> None:
    """Re-estimate every BatchNorm's running statistics over ``batches`` (cumulative average).

    A batch of one subject is skipped: the head's BatchNorm1d cannot take statistics over one
    sample (torch raises), and the cumulative average over the other batches is unaffected; with no
    batch of two or more, the statistics are left as they were."""
    bns = batchnorms(model)
    saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    used = 0
    for x in batches:
        if len(x) > 1:
            model(to_input(x, device))
            used += 1
    for bn, state in zip(bns, saved):
        bn.momentum = 0.1
        if not used:
            bn.load_state_dict(state)
    model.eval()


def class_weights(labels, num_classes: int = 2) -> torch.Tensor:
    counts = np.bincount(np.asarray(labels, int), minlength=num_classes).astype(float)
    w = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up to 1, then cosine decay to 0 (per optimiser step)."""
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        rest = max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / rest)))
    return f


# --- inference --------------------------------------------------------------------

def predict_proba(model: nn.Module, images, device, batch_size: int = 4, amp=None) -> np.ndarray:
    """P(positive) for a list/stack of (C, D, H, W) tensors, model in eval mode.

    Under torchrun every rank calls it: each predicts its share, all get every value.
    """
    dist = current_dist()
    if dist.enabled:
        rows = dist.map_sharded(lambda sub: _predict_proba(model, sub, device, batch_size, amp), list(images))
        return np.asarray(rows, dtype=np.float32)
    return _predict_proba(model, images, device, batch_size, amp)


@torch.no_grad()
def _batched(model: nn.Module, images, device, batch_size: int, amp, head) -> list[torch.Tensor]:
    """The one inference loop: eval mode, batches of ``batch_size``, autocast; ``head(model, x)``
    of every batch, as float32 on the CPU."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack(list(images[i:i + batch_size]))
        with autocast(device, amp):
            out.append(head(model, to_input(x, device)).float().cpu())
    return out


def _predict_proba(model: nn.Module, images, device, batch_size: int = 4, amp=None) -> np.ndarray:
    out = _batched(model, images, device, batch_size, amp,
                   lambda m, x: torch.softmax(m(x).float(), dim=1)[:, 1])
    return torch.cat(out).numpy() if out else np.zeros(0)


def pooled_features(model: nn.Module, images, device, batch_size: int = 4, amp=None) -> torch.Tensor:
    """Pooled encoder features (N, F); under torchrun split among the ranks like :func:`predict_proba`."""
    dist = current_dist()
    if dist.enabled:
        rows = dist.map_sharded(lambda sub: _pooled_features(model, sub, device, batch_size, amp), list(images))
        return torch.stack(rows) if rows else torch.zeros(0)
    return _pooled_features(model, images, device, batch_size, amp)


def _pooled_features(model: nn.Module, images, device, batch_size: int = 4, amp=None) -> torch.Tensor:
    return torch.cat(_batched(model, images, device, batch_size, amp, lambda m, x: m.features(x)))


def _val_metrics(y, p, weights) -> dict:
    from .metrics import binary_metrics

    y = np.asarray(y, int)
    p = np.clip(np.asarray(p, float), 1e-6, 1 - 1e-6)
    w = weights.numpy()[y]
    loss = float(-(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / w.sum())
    m = binary_metrics(y, p)
    return {"val_loss": loss, "val_auc": m["auc"], "val_accuracy": m["accuracy"]}


# --- checkpoints ------------------------------------------------------------------

def save_checkpoint(path: Path, payload: dict) -> None:
    with dv.atomic_path(path) as tmp:
        torch.save(payload, str(tmp))


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt checkpoint: start the fold over
        LOG.warning("checkpoint %s unreadable (%s); this fold starts over", path, exc.__class__.__name__)
        return None


def write_history(path: Path, history: list[dict]) -> None:
    keys = ["stage", "epoch", "train_loss", "val_loss", "val_auc", "val_accuracy", "lr", "seconds"]
    dv.write_tsv(path, {k: [h.get(k) for h in history] for k in keys})


class EarlyStopping:
    """The lowest validation loss so far and the state that reached it; stop after ``patience``
    checks without a decrease of more than ``min_delta``. Used by the fine-tuning (per epoch) and
    by the head warm-up (per step)."""

    def __init__(self, patience: int, min_delta: float = 1e-6, loss: float = float("inf"), epoch: int = 0,
                 state: dict | None = None, bad: int = 0):
        self.patience, self.min_delta = int(patience), float(min_delta)
        self.loss, self.epoch, self.state, self.bad = float(loss), int(epoch), state, int(bad)

    def update(self, loss: float, epoch: int, state_fn) -> bool:
        """Record one validation loss; ``state_fn()`` is called (the state copied) only on a new best."""
        if loss < self.loss - self.min_delta:
            self.loss, self.epoch, self.state, self.bad = float(loss), int(epoch), state_fn(), 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad >= self.patience


class FoldState:
    """What ``<ckpt_dir>/last.pt`` holds between epochs: the epoch reached, whether the head stage
    ran, the history so far and the early-stopping state (its best state included). The payload's
    keys are the checkpoint format (unchanged: a checkpoint of an older run still resumes)."""

    def __init__(self, patience: int, epoch: int = 0, head_done: bool = False, history=None, stopper=None):
        self.epoch, self.head_done = int(epoch), bool(head_done)
        self.history: list[dict] = list(history or [])
        self.stopper = stopper if stopper is not None else EarlyStopping(patience)

    def payload(self, model_state: dict, epoch: int, optimizer=None, scheduler=None) -> dict:
        s = self.stopper
        return {"model": model_state, "epoch": epoch, "bad": s.bad, "head_done": self.head_done,
                "history": self.history, "best_loss": s.loss, "best_epoch": s.epoch, "best_state": s.state,
                "optimizer": None if optimizer is None else optimizer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict()}

    @classmethod
    def from_payload(cls, state: dict, patience: int) -> "FoldState":
        stopper = EarlyStopping(patience, loss=state["best_loss"], epoch=state["best_epoch"],
                                state=state.get("best_state"), bad=int(state["bad"]))
        return cls(patience, int(state["epoch"]), bool(state["head_done"]), state["history"], stopper)


class TrainingLog:
    """The fold's history rows: kept in memory by every rank; rank 0 writes them to the TSV log and
    the fine-tuning rows to TensorBoard (optional)."""

    def __init__(self, path: Path, rows: list[dict], desc: str, tb_dir: Path | None, is_main: bool):
        self.path, self.rows, self.desc, self.is_main = Path(path), rows, desc, is_main
        self.writer = _tensorboard(tb_dir) if is_main else None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.writer is not None and row.get("stage") == "finetune":
            for k in ("train_loss", "val_loss", "val_auc", "lr"):
                if row.get(k) is not None:
                    self.writer.add_scalar(f"{self.desc}/{k}", row[k], row["epoch"])

    def write(self) -> None:
        if self.is_main:
            write_history(self.path, self.rows)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --- the fold -----------------------------------------------------------------------

class _Fit:
    """What one fold's training pieces share: data, loss, optimiser, schedule, precision, ranks."""

    def __init__(self, model: nn.Module, train_set: list[dict], val_set: list[dict], cfg, device, seed: int,
                 augment=None):
        self.model, self.train_set, self.val_set, self.device = model, train_set, val_set, device
        self.t_cfg, self.seed, self.augment, self.dist = cfg.train, int(seed), augment, current_dist()
        t = self.t_cfg
        self.norm_mode, self.bs, self.workers = t.norm_mode, int(t.batch_size), int(t.num_workers or 0)
        self.amp = amp_dtype(device, t.amp)
        self.y_train = [int(it["label"]) for it in train_set]
        self.y_val = [int(it["label"]) for it in val_set]
        self.weights = class_weights(self.y_train) if t.balance == "loss" else torch.ones(2)
        self.weights_dev = self.weights.to(device)
        self.criterion = nn.CrossEntropyLoss(weight=self.weights_dev)
        self.steps_per_epoch = max(1, math.ceil(len(train_set) / self.bs))
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(
            self.steps_per_epoch * int(t.warmup_epochs), self.steps_per_epoch * int(t.epochs)))
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None

    def save(self, ckpt: Path, fold: FoldState, epoch: int, with_opt: bool) -> None:
        from .classifier import adapter_state_dict
        opt = (self.optimizer, self.scheduler) if with_opt else (None, None)
        save_checkpoint(ckpt, fold.payload(adapter_state_dict(self.model), epoch, *opt))


def _start_fold(fit: _Fit, init: dict, ckpt: Path, resume: bool, desc: str) -> FoldState:
    """The fold's state: read back from ``ckpt`` (``--resume``), else the model reset to ``init``
    (and, ``norm_mode: recalibrate``, its normalisation statistics re-estimated)."""
    patience = int(fit.t_cfg.patience)
    state = fit.dist.on_main(load_checkpoint, ckpt) if resume else None
    restore_state(fit.model, init)
    if state is not None:
        fit.model.load_state_dict(state["model"], strict=False)
        fold = FoldState.from_payload(state, patience)
        if state.get("optimizer") is not None:
            fit.optimizer.load_state_dict(state["optimizer"])
            fit.scheduler.load_state_dict(state["scheduler"])
        LOG.info("%s: resuming after epoch %d (head stage %s)", desc, fold.epoch,
                 "done" if fold.head_done else "not done")
        return fold
    torch.manual_seed(fit.seed)
    if fit.norm_mode == "recalibrate":
        imgs, bs = ItemImages(fit.train_set), fit.bs
        recalibrate_norm(fit.model, (torch.stack(list(imgs[i:i + bs])) for i in range(0, len(imgs), bs)),
                         fit.device)
        fit.dist.sync_buffers(fit.model)          # every rank computed the same; take rank 0's bits
    return FoldState(patience)


def _head_stage(fit: _Fit, fold: FoldState, log: TrainingLog, ckpt: Path, desc: str) -> None:
    """Stage 1: the head alone on the encoder's cached pooled features (``train_head``)."""
    t_cfg, model, head_lr = fit.t_cfg, fit.model, float(fit.t_cfg.head_lr)
    t0 = time.perf_counter()
    f_tr = pooled_features(model, ItemImages(fit.train_set), fit.device, fit.bs, fit.amp)
    f_va = pooled_features(model, ItemImages(fit.val_set), fit.device, fit.bs, fit.amp) if fit.val_set else None
    res = train_head(model.head, f_tr, torch.tensor(fit.y_train), f_va,
                     torch.tensor(fit.y_val) if fit.val_set else None, fit.weights, int(t_cfg.head_epochs),
                     head_lr, t_cfg.weight_decay, fit.seed, fit.device)
    fold.head_done = True
    fit.dist.sync_state(model)                    # every rank trained the same head; take rank 0's bits
    log.add({"stage": "head", "epoch": 0, "train_loss": res["train_loss"], "lr": head_lr,
             "seconds": time.perf_counter() - t0, **res["val"]})
    LOG.info("%s: head warm-up %d steps (best %d): train loss %.3f, val loss %s, val AUC %s", desc,
             res["steps"], res["best_step"], res["train_loss"], _fmt(res["val"].get("val_loss")),
             _fmt(res["val"].get("val_auc")))
    s = fold.stopper
    s.loss = res["val"].get("val_loss", float("inf")) if fit.val_set else float("inf")
    s.epoch, s.state = 0, _state(model)
    with fit.dist.phase():                        # rank 0 writes; the others wait (and stop if it fails)
        if fit.dist.is_main:
            log.write()
            fit.save(ckpt, fold, 0, with_opt=False)


def _epoch_batches(fit: _Fit, epoch: int) -> list[tuple]:
    """This epoch's batches, after reseeding every random source from ``(seed, epoch)`` (a resumed
    fold replays an uninterrupted one's shuffles, augmentations and dropout)."""
    seed, augment, dist = fit.seed, fit.augment, fit.dist
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    torch.manual_seed(seed * 1000 + epoch)
    if augment is not None and hasattr(augment, "set_random_state"):
        # MONAI random transforms draw from their own numpy RandomState (seeded from
        # entropy at import), not from torch: reseed it too, or augmentations differ
        # between two runs and between a resumed and an uninterrupted fold
        augment.set_random_state(seed=seed * 1000 + epoch)
    n = len(fit.train_set)
    if fit.t_cfg.balance == "sampler":
        w = class_weights(fit.y_train)[torch.tensor(fit.y_train)]
        order = torch.multinomial(w, n, replacement=True, generator=g).tolist()
    else:
        order = torch.randperm(n, generator=g).tolist()
    set_mode(fit.model, True, fit.norm_mode)
    if dist.enabled and dist.rank:
        # dropout and augmentation: other random draws on each rank (rank 0 keeps a single process's)
        rank_seed = seed * 1000 + epoch + 100_003 * dist.rank
        torch.manual_seed(rank_seed)
        if augment is not None and hasattr(augment, "set_random_state"):
            augment.set_random_state(seed=rank_seed % 2 ** 32)
    steps = []
    for i in range(0, len(order), fit.bs):
        idx = order[i:i + fit.bs]
        if len(idx) < 2 and fit.norm_mode == "train" and len(order) > 1:
            idx = idx + [order[0]]                      # BatchNorm needs > 1 sample in train mode
        steps.append(_shard_batch(dist, idx, fit.y_train, fit.weights, fit.norm_mode))
    return steps


def _step(fit: _Fit, net: nn.Module, x: torch.Tensor, y: torch.Tensor, keep, denom) -> torch.Tensor:
    """One optimiser and scheduler step; returns the batch's loss as reported (this rank's share)."""
    with autocast(fit.device, fit.amp):
        logits = net(x)
    if keep is None:
        loss = fit.criterion(logits.float(), y)
        reported = loss
    else:
        w = fit.weights_dev[y] * torch.tensor(keep, device=fit.device)
        reported = (F.cross_entropy(logits.float(), y, reduction="none") * w).sum() / denom
        loss = reported * fit.dist.world              # DDP averages the gradients over the ranks
    fit.optimizer.zero_grad(set_to_none=True)
    if fit.scaler is not None:
        fit.scaler.scale(loss).backward()
        fit.scaler.step(fit.optimizer)
        fit.scaler.update()
    else:
        loss.backward()
        fit.optimizer.step()
    fit.scheduler.step()
    return reported


def train_epoch(fit: _Fit, net: nn.Module, epoch: int, bar) -> float:
    """One fine-tuning epoch over the training subjects; the mean loss of the global batches."""
    steps = _epoch_batches(fit, epoch)
    losses = []
    # the images are read per batch (workers read ahead); augmentation stays in this process
    for (idx, keep, denom), loaded in zip(steps, batch_loader(fit.train_set, [s[0] for s in steps], fit.workers)):
        batch = [fit.train_set[j] for j in idx]
        # "is not None", never "if augment": bool(Compose) calls len() -> flatten(), which builds
        # a new Compose whose __init__ reseeds the SAME transforms from entropy (MONAI 1.x)
        imgs = [fit.augment({"image": im})["image"] if fit.augment is not None else im for im in loaded]
        x = to_input(torch.stack([torch.as_tensor(im) for im in imgs]).float(), fit.device)
        y = torch.tensor([int(it["label"]) for it in batch], device=fit.device)
        losses.append(float(_step(fit, net, x, y, keep, denom).detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses) * fit.dist.world:.3f}")   # with ranks: an estimate
    losses = fit.dist.all_sum(losses)                   # the global batches' losses
    fit.dist.sync_buffers(fit.model)                    # BatchNorm statistics: rank 0's
    return float(np.mean(losses))


def validate(fit: _Fit) -> dict:
    """``val_loss`` (class-weighted), ``val_auc``, ``val_accuracy`` of the inner-validation subjects."""
    p = predict_proba(fit.model, ItemImages(fit.val_set), fit.device, fit.bs, fit.amp)
    return _val_metrics(fit.y_val, p, fit.weights)


def _fine_tune_epoch(fit: _Fit, fold: FoldState, log: TrainingLog, net: nn.Module, epoch_of: tuple, bar,
                     ckpt: Path, desc: str) -> bool:
    """One epoch: train, validate, early-stopping update (rank 0 decides for all), history row,
    checkpoint (rank 0 writes). True: stop early."""
    (epoch, epochs), dist, val_set = epoch_of, fit.dist, fit.val_set
    t0 = time.perf_counter()
    row = {"stage": "finetune", "epoch": epoch, "train_loss": train_epoch(fit, net, epoch, bar),
           "lr": fit.optimizer.param_groups[0]["lr"]}
    row = dist.broadcast({**row, **validate(fit)} if val_set else row)
    if val_set:
        fold.stopper.update(row["val_loss"], epoch, lambda: _state(fit.model))
    row["seconds"] = time.perf_counter() - t0
    log.add(row)
    LOG.info("%s epoch %d/%d: train loss %.3f, val loss %s, val AUC %s (%.0f s)", desc, epoch, epochs,
             row["train_loss"], _fmt(row.get("val_loss")), _fmt(row.get("val_auc")), row["seconds"])
    with dist.phase():
        if dist.is_main:
            log.write()
            fit.save(ckpt, fold, epoch, with_opt=True)
    return bool(val_set) and fold.stopper.should_stop


def train_model(model: nn.Module, init: dict, train_set: list[dict], val_set: list[dict], cfg, device,
                *, ckpt_dir: Path, log_path: Path, seed: int, resume: bool = False, progress: bool = True,
                desc: str = "training", augment=None, tb_dir: Path | None = None) -> dict:
    """Train ``model`` in place on ``train_set`` (dicts with ``image`` tensor and ``label``).

    ``val_set`` drives early stopping (may be empty: then all epochs run and the
    last state is kept). ``augment``: a callable on ``{"image": tensor}`` dicts
    (MONAI random transforms) applied to training batches. Returns
    ``{"history", "best_epoch", "epochs_run", "stopped_early", "seconds", "peak_memory_mb"}``.

    Under torchrun (see :mod:`bids_adhd.learn.distributed`) every rank calls it
    with the same arguments: the batches are split among the ranks, the
    fine-tuning runs in DistributedDataParallel, decisions come from rank 0 and
    only rank 0 writes the checkpoint, the log and TensorBoard.
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fit = _Fit(model, train_set, val_set, cfg, device, seed, augment)
    dist, ckpt = fit.dist, Path(ckpt_dir) / "last.pt"
    fold = _start_fold(fit, init, ckpt, resume, desc)
    log = TrainingLog(log_path, fold.history, desc, tb_dir, dist.is_main)
    if int(cfg.train.head_epochs) > 0 and not fold.head_done:
        _head_stage(fit, fold, log, ckpt, desc)
    # resumed after the checkpoint of the epoch that stopped the run early (killed before the
    # fold's outputs were written): it stays stopped, as the uninterrupted run did
    start = epoch = fold.epoch
    stopped = bool(val_set) and start > 0 and fold.stopper.should_stop
    epochs = start if stopped else int(cfg.train.epochs)
    bar = tqdm(total=(epochs - start) * fit.steps_per_epoch, desc=desc, file=sys.stderr,
               disable=not progress or not dist.is_main, leave=False, dynamic_ncols=True, unit="step")
    # several processes: DDP for the fine-tuning (it starts from rank 0's state); the loss of
    # each rank is its share of the global batch's weighted mean (see _shard_batch)
    net = dist.wrap(model) if epochs > start else model
    for epoch in range(start + 1, epochs + 1):
        if _fine_tune_epoch(fit, fold, log, net, (epoch, epochs), bar, ckpt, desc):
            LOG.info("%s: early stop after epoch %d (best epoch %d)", desc, epoch, fold.stopper.epoch)
            stopped = True
            break
    bar.close()
    if net is not model:
        dist.release(net)
        del net
    log.close()
    best = fold.stopper
    if val_set and best.state is not None:
        model.load_state_dict(best.state, strict=False)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return {"history": fold.history, "best_epoch": best.epoch if val_set else epoch, "epochs_run": epoch,
            "stopped_early": stopped, "seconds": time.perf_counter() - t_start, "peak_memory_mb": peak}


def _shard_batch(dist, idx: list[int], y_train: list[int], weights: torch.Tensor, norm_mode: str):
    """(this rank's indices, their loss weights or None, the global batch's weight sum).

    One process: the batch as it is, ``None`` (the plain weighted-mean loss).
    Several: the global batch's weighted count (every rank knows the whole batch)
    and this rank's share, padded with zero-weight copies (at least 2 items per
    rank when BatchNorm uses batch statistics).
    """
    if not dist.enabled:
        return idx, None, None
    denom = float(weights[torch.tensor([y_train[j] for j in idx])].sum())
    mine, keep = dist.shard(idx, 2 if norm_mode == "train" else 1)
    return mine, keep, max(denom, 1e-12)


def _state(model: nn.Module) -> dict:
    from .classifier import adapter_state_dict
    return adapter_state_dict(model)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _tensorboard(tb_dir):
    if tb_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:      # tensorboard not installed: optional
        return None
    return SummaryWriter(str(tb_dir))


def train_head(head: nn.Module, f_tr: torch.Tensor, y_tr: torch.Tensor, f_va, y_va, weights, steps: int,
               lr: float, weight_decay: float, seed: int, device) -> dict:
    """Full-batch AdamW on cached features; early stopping on the validation loss (patience 50 steps)."""
    torch.manual_seed(seed)
    head.to(device)
    params = [p for p in head.parameters() if p.requires_grad]
    if not params:
        return {"steps": 0, "best_step": 0, "train_loss": float("nan"), "val": {}}
    # normalisation layers inside the head (e.g. a feature BatchNorm): full-batch statistics
    for bn in batchnorms(head):
        bn.reset_running_stats()
        bn.momentum = None
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    f_tr, y_tr = f_tr.to(device), y_tr.to(device)
    w = weights.to(device)
    stopper = EarlyStopping(patience=50)
    loss = torch.tensor(float("nan"))
    step = 0
    for step in range(1, steps + 1):
        head.train()
        for bn in batchnorms(head):
            if step > 1:
                bn.eval()              # statistics from the first full batch = the training set's
        loss = F.cross_entropy(head(f_tr), y_tr, weight=w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if f_va is not None and len(f_va):
            head.eval()
            with torch.no_grad():
                vl = float(F.cross_entropy(head(f_va.to(device)), y_va.to(device), weight=w))
            stopper.update(vl, step, lambda: {k: v.detach().clone() for k, v in head.state_dict().items()})
            if stopper.should_stop:
                break
    head.eval()
    val = {}
    if stopper.state is not None:
        head.load_state_dict(stopper.state)
    if f_va is not None and len(f_va):
        with torch.no_grad():
            p = torch.softmax(head(f_va.to(device)), 1)[:, 1].cpu().numpy()
        val = _val_metrics(y_va.numpy(), p, weights)
    with torch.no_grad():
        tl = float(F.cross_entropy(head(f_tr), y_tr, weight=w))
    return {"steps": step, "best_step": stopper.epoch if stopper.state is not None else step, "train_loss": tl,
            "val": val}

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
    """channels_last_3d: about 3x faster Conv3d with oneDNN on the CPU (measured); fine on CUDA."""
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
    """Re-estimate every BatchNorm's running statistics over ``batches`` (cumulative average)."""
    bns = batchnorms(model)
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for x in batches:
        model(to_input(x, device))
    for bn in bns:
        bn.momentum = 0.1
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
def _predict_proba(model: nn.Module, images, device, batch_size: int = 4, amp=None) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack(list(images[i:i + batch_size]))
        with autocast(device, amp):
            logits = model(to_input(x, device))
        out.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def pooled_features(model: nn.Module, images, device, batch_size: int = 4, amp=None) -> torch.Tensor:
    """Pooled encoder features (N, F); under torchrun split among the ranks like :func:`predict_proba`."""
    dist = current_dist()
    if dist.enabled:
        rows = dist.map_sharded(lambda sub: _pooled_features(model, sub, device, batch_size, amp), list(images))
        return torch.stack(rows) if rows else torch.zeros(0)
    return _pooled_features(model, images, device, batch_size, amp)


@torch.no_grad()
def _pooled_features(model: nn.Module, images, device, batch_size: int = 4, amp=None) -> torch.Tensor:
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack(list(images[i:i + batch_size]))
        with autocast(device, amp):
            out.append(model.features(to_input(x, device)).float().cpu())
    return torch.cat(out)


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


# --- the fold -----------------------------------------------------------------------

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

    dist = current_dist()
    t_cfg = cfg.train
    norm_mode = getattr(t_cfg, "norm_mode", "train")
    head_epochs = int(getattr(t_cfg, "head_epochs", 0))
    head_lr = float(getattr(t_cfg, "head_lr", 1e-2))
    amp = amp_dtype(device, t_cfg.amp)
    ckpt = Path(ckpt_dir) / "last.pt"
    y_train = [int(it["label"]) for it in train_set]
    y_val = [int(it["label"]) for it in val_set]
    weights = class_weights(y_train) if t_cfg.balance == "loss" else torch.ones(2)
    criterion = nn.CrossEntropyLoss(weight=weights.to(device))
    trainable = [p for p in model.parameters() if p.requires_grad]
    bs = int(t_cfg.batch_size)
    workers = int(getattr(t_cfg, "num_workers", 0) or 0)
    steps_per_epoch = max(1, math.ceil(len(train_set) / bs))
    total_steps = steps_per_epoch * int(t_cfg.epochs)
    t_start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    state = dist.on_main(load_checkpoint, ckpt) if resume else None
    history: list[dict] = []
    best = {"loss": float("inf"), "epoch": 0, "state": None}
    start_epoch, bad = 0, 0
    head_done = False

    optimizer = torch.optim.AdamW(trainable, lr=t_cfg.lr, weight_decay=t_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(steps_per_epoch * int(t_cfg.warmup_epochs), total_steps))
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    if state is not None:
        restore_state(model, init)
        model.load_state_dict(state["model"], strict=False)
        history = list(state["history"])
        best = {"loss": state["best_loss"], "epoch": state["best_epoch"], "state": state.get("best_state")}
        start_epoch, bad, head_done = int(state["epoch"]), int(state["bad"]), bool(state["head_done"])
        if state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        LOG.info("%s: resuming after epoch %d (head stage %s)", desc, start_epoch,
                 "done" if head_done else "not done")
    else:
        restore_state(model, init)
        torch.manual_seed(seed)
        if norm_mode == "recalibrate":
            imgs = ItemImages(train_set)
            recalibrate_norm(model, (torch.stack(list(imgs[i:i + bs])) for i in range(0, len(imgs), bs)), device)
            dist.sync_buffers(model)          # every rank computed the same; take rank 0's bits

    def checkpoint(epoch: int, with_opt: bool):
        from .classifier import adapter_state_dict
        save_checkpoint(ckpt, {"model": adapter_state_dict(model), "epoch": epoch, "bad": bad,
                               "head_done": head_done, "history": history, "best_loss": best["loss"],
                               "best_epoch": best["epoch"], "best_state": best["state"],
                               "optimizer": optimizer.state_dict() if with_opt else None,
                               "scheduler": scheduler.state_dict() if with_opt else None})

    # --- stage 1: head on cached features --------------------------------------
    if head_epochs > 0 and not head_done:
        t0 = time.perf_counter()
        f_tr = pooled_features(model, ItemImages(train_set), device, bs, amp)
        f_va = pooled_features(model, ItemImages(val_set), device, bs, amp) if val_set else None
        res = train_head(model.head, f_tr, torch.tensor(y_train), f_va,
                         torch.tensor(y_val) if val_set else None, weights, head_epochs, head_lr,
                         t_cfg.weight_decay, seed, device)
        head_done = True
        dist.sync_state(model)                # every rank trained the same head; take rank 0's bits
        history.append({"stage": "head", "epoch": 0, "train_loss": res["train_loss"], "lr": head_lr,
                        "seconds": time.perf_counter() - t0, **res["val"]})
        LOG.info("%s: head warm-up %d steps (best %d): train loss %.3f, val loss %s, val AUC %s", desc,
                 res["steps"], res["best_step"], res["train_loss"], _fmt(res["val"].get("val_loss")),
                 _fmt(res["val"].get("val_auc")))
        best = {"loss": res["val"].get("val_loss", float("inf")) if val_set else float("inf"), "epoch": 0,
                "state": _state(model)}
        with dist.phase():                    # rank 0 writes; the others wait (and stop if it fails)
            if dist.is_main:
                write_history(log_path, history)
                checkpoint(0, with_opt=False)

    # --- stage 2: fine-tuning ----------------------------------------------------
    epochs = int(t_cfg.epochs)
    # resumed after the checkpoint of the epoch that stopped the run early (killed before the
    # fold's outputs were written): it stays stopped, as the uninterrupted run did
    stopped_before = bool(val_set) and start_epoch > 0 and bad >= int(t_cfg.patience)
    if stopped_before:
        epochs = start_epoch
    bar = tqdm(total=(epochs - start_epoch) * steps_per_epoch, desc=desc, file=sys.stderr,
               disable=not progress or not dist.is_main, leave=False, dynamic_ncols=True, unit="step")
    writer = _tensorboard(tb_dir) if dist.is_main else None
    stopped = stopped_before
    epoch = start_epoch
    # several processes: DDP for the fine-tuning (it starts from rank 0's state); the loss of
    # each rank is its share of the global batch's weighted mean (see _shard_batch)
    net = dist.wrap(model) if epochs > start_epoch else model
    weights_dev = weights.to(device)
    for epoch in range(start_epoch + 1, epochs + 1):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(int(seed) * 1000 + epoch)
        torch.manual_seed(int(seed) * 1000 + epoch)
        if augment is not None and hasattr(augment, "set_random_state"):
            # MONAI random transforms draw from their own numpy RandomState (seeded from
            # entropy at import), not from torch: reseed it too, or augmentations differ
            # between two runs and between a resumed and an uninterrupted fold
            augment.set_random_state(seed=int(seed) * 1000 + epoch)
        if t_cfg.balance == "sampler":
            w = class_weights(y_train)[torch.tensor(y_train)]
            order = torch.multinomial(w, len(train_set), replacement=True, generator=g).tolist()
        else:
            order = torch.randperm(len(train_set), generator=g).tolist()
        set_mode(model, True, norm_mode)
        if dist.enabled and dist.rank:
            # dropout and augmentation: other random draws on each rank (rank 0 keeps a single process's)
            rank_seed = int(seed) * 1000 + epoch + 100_003 * dist.rank
            torch.manual_seed(rank_seed)
            if augment is not None and hasattr(augment, "set_random_state"):
                augment.set_random_state(seed=rank_seed % 2 ** 32)
        losses = []
        steps = []
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            if len(idx) < 2 and norm_mode == "train" and len(order) > 1:
                idx = idx + [order[0]]                      # BatchNorm needs > 1 sample in train mode
            steps.append(_shard_batch(dist, idx, y_train, weights, norm_mode))
        # the images are read per batch (workers read ahead); augmentation stays in this process
        for (idx, keep, denom), loaded in zip(steps, batch_loader(train_set, [s[0] for s in steps], workers)):
            batch = [train_set[j] for j in idx]
            # "is not None", never "if augment": bool(Compose) calls len() -> flatten(), which builds
            # a new Compose whose __init__ reseeds the SAME transforms from entropy (MONAI 1.x)
            imgs = [augment({"image": im})["image"] if augment is not None else im for im in loaded]
            x = to_input(torch.stack([torch.as_tensor(im) for im in imgs]).float(), device)
            y = torch.tensor([int(it["label"]) for it in batch], device=device)
            with autocast(device, amp):
                logits = net(x)
            if keep is None:
                loss = criterion(logits.float(), y)
                reported = loss
            else:
                w = weights_dev[y] * torch.tensor(keep, device=device)
                reported = (F.cross_entropy(logits.float(), y, reduction="none") * w).sum() / denom
                loss = reported * dist.world              # DDP averages the gradients over the ranks
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            losses.append(float(reported.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses) * dist.world:.3f}")   # with ranks: an estimate
        losses = dist.all_sum(losses)                       # the global batches' losses
        dist.sync_buffers(model)                            # BatchNorm statistics: rank 0's
        row = {"stage": "finetune", "epoch": epoch, "train_loss": float(np.mean(losses)),
               "lr": optimizer.param_groups[0]["lr"]}
        if val_set:
            p = predict_proba(model, ItemImages(val_set), device, bs, amp)
            row.update(_val_metrics(y_val, p, weights))
        row = dist.broadcast(row)                           # rank 0 decides early stopping for all
        if val_set:
            if row["val_loss"] < best["loss"] - 1e-6:
                best = {"loss": row["val_loss"], "epoch": epoch, "state": _state(model)}
                bad = 0
            else:
                bad += 1
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        LOG.info("%s epoch %d/%d: train loss %.3f, val loss %s, val AUC %s (%.0f s)", desc, epoch, epochs,
                 row["train_loss"], _fmt(row.get("val_loss")), _fmt(row.get("val_auc")), row["seconds"])
        if writer is not None:
            for k in ("train_loss", "val_loss", "val_auc", "lr"):
                if row.get(k) is not None:
                    writer.add_scalar(f"{desc}/{k}", row[k], epoch)
        with dist.phase():
            if dist.is_main:
                write_history(log_path, history)
                checkpoint(epoch, with_opt=True)
        if val_set and bad >= int(t_cfg.patience):
            LOG.info("%s: early stop after epoch %d (best epoch %d)", desc, epoch, best["epoch"])
            stopped = True
            break
    bar.close()
    if net is not model:
        dist.release(net)
        del net
    if writer is not None:
        writer.close()
    if val_set and best["state"] is not None:
        model.load_state_dict(best["state"], strict=False)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return {"history": history, "best_epoch": best["epoch"] if val_set else epoch, "epochs_run": epoch,
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
    best = (float("inf"), 0, None)
    patience, since = 50, 0
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
            if vl < best[0] - 1e-6:
                best = (vl, step, {k: v.detach().clone() for k, v in head.state_dict().items()})
                since = 0
            else:
                since += 1
                if since >= patience:
                    break
    head.eval()
    val = {}
    if best[2] is not None:
        head.load_state_dict(best[2])
    if f_va is not None and len(f_va):
        with torch.no_grad():
            p = torch.softmax(head(f_va.to(device)), 1)[:, 1].cpu().numpy()
        val = _val_metrics(y_va.numpy(), p, weights)
    with torch.no_grad():
        tl = float(F.cross_entropy(head(f_tr), y_tr, weight=w))
    return {"steps": step, "best_step": best[1] if best[2] is not None else step, "train_loss": tl, "val": val}

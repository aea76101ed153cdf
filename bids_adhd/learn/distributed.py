"""The group level on several processes: ``torchrun`` and DistributedDataParallel.

Started by ``torchrun`` (or by anything that sets the same variables: ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) with
``WORLD_SIZE`` > 1, the group level runs as one process ("rank") per GPU, or per
CPU process with ``--device cpu``. ``docs/deploy.md`` has the commands.

* **Process group.** ``init_process_group`` with NCCL when the device is CUDA
  (rank → ``cuda:LOCAL_RANK``; a node needs as many visible GPUs as it starts
  processes), gloo on the CPU. ``destroy_process_group`` at the end, also after
  an error.
* **Same inputs, same decisions.** Every rank reads the inputs, builds the model
  from the same seed and computes the fold assignment; the subjects, labels,
  encoder fingerprint and assignment are compared across ranks
  (:meth:`Dist.check_same`) and a difference stops the run (exit 64): it means
  other arguments, package versions or an OUTPUT_DIR that is not the same on
  every node. On ``--resume`` rank 0 reads the saved assignment and sends it to
  the others.
* **Training.** The seeded shuffle of a single process gives the global batches
  (``batch_size`` stays the *global* batch, so the learning-rate schedule and
  the number of steps do not depend on the number of processes); rank r takes
  items r, r + W, ... of each batch (:meth:`Dist.shard`, DistributedSampler's
  split). A batch is padded to a multiple of W (at least 2 per rank when
  BatchNorm learns batch statistics) with copies whose loss weight is 0, and
  each rank's loss is its share of the global batch's class-weighted mean, so
  that DDP's gradient average is the gradient of the same loss a single process
  computes. The model is wrapped in ``DistributedDataParallel`` for the
  fine-tuning stage only; only trainable parameters (LoRA, norm affine, head)
  get gradients and are all-reduced; every trainable parameter is used in every
  forward pass, so ``find_unused_parameters`` stays off.
* **BatchNorm.** With ``norm_mode: train`` each process normalises with the
  statistics of its own part of the batch (standard DDP) on the CPU; on CUDA the
  encoder's BatchNorm layers become ``SyncBatchNorm`` (statistics of the global
  batch, as on one GPU) unless ``BIDS_ADHD_SYNC_BN=0``. Running statistics are
  taken from rank 0 before every evaluation (:meth:`Dist.sync_buffers`).
  ``recalibrate`` and ``frozen`` keep BatchNorm in eval mode while training:
  nothing to synchronise.
* **Inference** (validation, test predictions, head features) is split among the
  ranks and gathered in the original order (:meth:`Dist.map_sharded`).
  Validation metrics and early stopping are decided on rank 0 and broadcast.
* **Files.** Only rank 0 writes (``group/``, checkpoints, logs, TensorBoard,
  the report); the others wait at the end of each step (:meth:`Dist.phase`,
  :meth:`Dist.on_main`). Other ranks log errors only (``-vv``: everything,
  prefixed with the rank).
* **Errors.** Each step ends with an agreement: every rank tells whether it
  failed; if one did, every rank raises, with the failing rank's one-line message
  and BIDS-Apps exit code (:class:`PeerError`), so no rank waits forever in a
  collective. A crash inside a collective (for example running out of GPU
  memory in the middle of a training step) ends that process; ``torchrun``
  then stops the others, and the collective timeout (``BIDS_ADHD_DIST_TIMEOUT``
  minutes, default 30) bounds the wait of ranks started without ``torchrun``.
"""
from __future__ import annotations

from collections.abc import Sequence

import contextlib
import datetime
import hashlib
import json
import logging
import os
import signal
import socket
import sys

import torch

from ..errors import BidsAppError, UsageError

LOG = logging.getLogger("bids_adhd.group")

ENV_TIMEOUT = "BIDS_ADHD_DIST_TIMEOUT"
ENV_SYNC_BN = "BIDS_ADHD_SYNC_BN"
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class PeerError(BidsAppError):
    """Another rank failed: this one stops too, with that rank's message and exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = int(exit_code)


def _describe(exc: BaseException, rank: int) -> tuple[int, str, int]:
    if isinstance(exc, BidsAppError):
        return exc.exit_code, exc.message, rank
    text = " ".join(str(exc).split())[:300]
    return 1, f"rank {rank} failed: {exc.__class__.__name__}: {text}", rank


def launched_by_torchrun(env=None) -> bool:
    env = os.environ if env is None else env
    return all(k in env for k in TORCHRUN_VARS)


class Dist:
    """The processes of this run. ``Dist()`` is the single process: every method is then a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, backend: str | None = None,
                 device: torch.device | None = None):
        self.rank, self.world, self.local_rank = int(rank), int(world), int(local_rank)
        self.backend, self.device = backend, device

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- errors and barriers ---------------------------------------------------------
    def agree(self, exc: BaseException | None = None) -> None:
        """Collective: raise on every rank if any rank failed (``exc`` is this rank's failure)."""
        if not self.enabled:
            if exc is not None:
                raise exc
            return
        everyone = [None] * self.world
        torch.distributed.all_gather_object(everyone, None if exc is None else _describe(exc, self.rank))
        if exc is not None:
            raise exc
        failed = [f for f in everyone if f is not None]
        if failed:
            code, message, _ = failed[0]
            raise PeerError(message, code)

    @contextlib.contextmanager
    def phase(self):
        """``with dist.phase(): ...`` ends with :meth:`agree`: a barrier that passes errors on."""
        exc = None
        try:
            yield
        except Exception as e:       # noqa: BLE001 (re-raised by agree on this rank)
            exc = e
        self.agree(exc)

    def on_main(self, fn, *args, **kwargs):
        """``fn`` on rank 0 only; the others wait; its result (or its error) reaches every rank."""
        if not self.enabled:
            return fn(*args, **kwargs)
        result, exc = None, None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:   # noqa: BLE001
                exc = e
        result, failure = self.broadcast((result, None if exc is None else _describe(exc, 0)))
        if exc is not None:
            raise exc
        if failure is not None:
            raise PeerError(failure[1], failure[0])
        return result

    # --- data -------------------------------------------------------------------------
    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (picklable)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks of equally long lists of numbers."""
        if not self.enabled or not values:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64,
                         device=self.device if self.backend == "nccl" else "cpu")
        torch.distributed.all_reduce(t)
        return [float(v) for v in t.cpu()]

    def check_same(self, value, what: str) -> None:
        """Stop every rank (exit 64) unless ``value`` is the same on all of them."""
        if not self.enabled:
            return
        digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
        everyone = [None] * self.world
        torch.distributed.all_gather_object(everyone, digest)
        differ = [r for r, d in enumerate(everyone) if d != everyone[0]]
        if differ:
            raise UsageError(f"torchrun: rank(s) {', '.join(map(str, differ))} see a different {what} than rank 0; "
                             "start every rank with the same arguments and package versions, on an OUTPUT_DIR "
                             "(and weights) that every node shares")

    def shard(self, idx: list[int], min_per_rank: int = 1) -> tuple[list[int], list[float]]:
        """This rank's part of a global batch ``idx`` and the loss weight of each item (0: padding).

        The batch is padded to ``W * max(ceil(n / W), min_per_rank)`` items by
        repeating its own items; rank r takes items r, r + W, ...
        """
        n = len(idx)
        if not self.enabled:
            return list(idx), [1.0] * n
        per = max(-(-n // self.world), int(min_per_rank))
        total = per * self.world
        padded = list(idx) + [idx[j % n] for j in range(total - n)]
        keep = [1.0] * n + [0.0] * (total - n)
        return padded[self.rank::self.world], keep[self.rank::self.world]

    def map_sharded(self, fn, items) -> list:
        """``fn(sublist)`` → one row per item, for ``items[rank::W]`` on each rank; all rows, in order, on all.

        A sequence (e.g. the lazy :class:`~bids_adhd.learn.data.ItemImages`) is sliced, not listed: its
        images are read only by the rank that uses them."""
        items = items if isinstance(items, Sequence) else list(items)
        if not self.enabled:
            return list(fn(items)) if items else []
        sub = items[self.rank::self.world]
        rows, exc = None, None
        try:
            rows = fn(sub) if sub else []
        except Exception as e:       # noqa: BLE001
            exc = e
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, (rows, None if exc is None else _describe(exc, self.rank)))
        if exc is not None:
            raise exc
        failed = [f for _, f in parts if f is not None]
        if failed:
            raise PeerError(failed[0][1], failed[0][0])
        out = [None] * len(items)
        for r, (part, _) in enumerate(parts):
            for j, row in enumerate(part):
                out[r + j * self.world] = row
        return out

    # --- model ------------------------------------------------------------------------
    def _broadcast_tensors(self, tensors) -> None:
        for t in tensors:
            torch.distributed.broadcast(t.data, src=0)

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """BatchNorm running statistics from rank 0 (each rank updated its own while training)."""
        if not self.enabled:
            return
        with torch.no_grad():
            self._broadcast_tensors(b for m in model.modules()
                                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                    for b in m.buffers(recurse=False) if b is not None)

    def sync_state(self, model: torch.nn.Module) -> None:
        """Trainable parameters and BatchNorm buffers from rank 0."""
        if not self.enabled:
            return
        with torch.no_grad():
            self._broadcast_tensors(p for p in model.parameters() if p.requires_grad)
        self.sync_buffers(model)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``DistributedDataParallel(model)`` (synchronises the state from rank 0), or ``model``."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # buffers (BatchNorm statistics) go from rank 0 to the others before each forward: DDP's default
        return DistributedDataParallel(model, device_ids=[self.device] if self.backend == "nccl" else None,
                                       find_unused_parameters=False)

    @staticmethod
    def release(net: torch.nn.Module) -> None:
        """Remove a DDP wrapper's gradient hooks from the parameters (the model is reused by the next fold)."""
        remove = getattr(net, "_remove_autograd_hooks", None)
        if remove is not None:
            try:
                remove()
            except Exception:        # noqa: BLE001 (older torch: the reducer removes them when collected)
                pass

    def prepare_model(self, model: torch.nn.Module, cfg) -> bool:
        """SyncBatchNorm in the encoder on CUDA when BatchNorm learns batch statistics; True if converted."""
        if not (self.enabled and self.backend == "nccl" and cfg.train.norm_mode == "train"
                and not getattr(model, "freeze_norm_stats", False) and os.environ.get(ENV_SYNC_BN, "1") != "0"):
            return False
        model.encoder = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder)
        return True


_CURRENT = Dist()
_SAVED_LOGGING: dict = {}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when PyTorch sees a GPU, else CPU), ``cpu`` or ``cuda`` (refused without a GPU)."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is available to PyTorch here; use --device cpu or auto")
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def current() -> Dist:
    """The processes of the run in progress (``Dist()`` outside a torchrun run)."""
    return _CURRENT


def setup(device_name: str = "auto") -> tuple[Dist, torch.device]:
    """The device of this process and, under torchrun with WORLD_SIZE > 1, the process group."""
    global _CURRENT
    device = resolve_device(device_name)
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        _CURRENT = Dist()
        return _CURRENT, device
    rank, world, local = (int(os.environ[k]) for k in TORCHRUN_VARS)
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if local >= n:
            raise UsageError(f"torchrun: local rank {local} on {socket.gethostname()} has no GPU of its own "
                             f"({n} visible); start at most {n} process(es) per node (--nproc-per-node {n})")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    _die_with_parent()
    minutes = float(os.environ.get(ENV_TIMEOUT) or 30)
    torch.distributed.init_process_group(backend, rank=rank, world_size=world,
                                         timeout=datetime.timedelta(minutes=minutes))
    _CURRENT = Dist(rank, world, local, backend, device)
    _quiet_other_ranks(rank)
    LOG.info("torchrun: %d processes, backend %s, device of rank 0: %s", world, backend, device)
    return _CURRENT, device


def _die_with_parent() -> None:
    """Under torchrun (Linux): SIGTERM to this rank when the torchrun agent dies.

    torchrun starts each rank in its own session; if torchrun itself is killed
    (SIGKILL, OOM killer) its ranks would otherwise go on training and writing,
    without anyone to stop them when a peer fails.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)        # PR_SET_PDEATHSIG
    except Exception:                # noqa: BLE001 (best effort)
        return
    if os.getppid() == 1:            # the agent died before prctl
        raise UsageError("torchrun: the launcher is gone; nothing to run for")


def _quiet_other_ranks(rank: int) -> None:
    """Ranks other than 0 log errors only (all with -vv), prefixed with their rank."""
    if rank == 0:
        return
    root = logging.getLogger("bids_adhd")
    _SAVED_LOGGING.update(level=root.level, formats=[(h, h.formatter) for h in root.handlers])
    if root.getEffectiveLevel() > logging.DEBUG:
        root.setLevel(logging.ERROR)
    for h in root.handlers:
        h.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S"))


def leaving() -> None:
    """This rank is stopping on an error: ignore torchrun's SIGTERM and finish the exit (message, code).

    ``torchrun`` stops the other ranks with SIGTERM as soon as one exits with an
    error; the others are on their way out with the same error, so they finish
    printing it and exit with the same BIDS-Apps code instead of -15 (torchrun
    SIGKILLs a rank that has not exited 30 s later).
    """
    if not _CURRENT.enabled:
        return
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:               # not the main thread
        pass


def close() -> None:
    """``destroy_process_group`` (if one was started) and back to a single process."""
    global _CURRENT
    was, _CURRENT = _CURRENT, Dist()
    if was.enabled and torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:            # noqa: BLE001 (a peer is gone: nothing left to tear down cleanly)
            pass
    if _SAVED_LOGGING:
        root = logging.getLogger("bids_adhd")
        root.setLevel(_SAVED_LOGGING["level"])
        for h, f in _SAVED_LOGGING["formats"]:
            h.setFormatter(f)
        _SAVED_LOGGING.clear()

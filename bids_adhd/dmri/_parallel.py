"""Small helpers for the numerical core: thread limits and worker pools.

Two kinds of parallelism are used by ``bids_adhd.dmri``:

* **threads** (:func:`thread_map`) for numpy/scipy/torch kernels that release
  the GIL (batched FFTs, batched ``eigh``, matrix products). Each worker runs
  with BLAS/OpenMP limited to one thread, so ``nprocs`` workers use
  ``nprocs`` cores and never oversubscribe.
* **processes** (:func:`process_imap`) for Python-heavy work (DIPY's affine
  registration). The pool uses an explicit ``fork`` (or, where fork does not
  exist or ``BIDS_ADHD_MP_CONTEXT`` says so, ``forkserver``) *context*; the
  global start method is never changed. (DIPY's own
  ``gibbs_removal(num_processes>1)`` calls ``mp.set_start_method("spawn",
  force=True)`` for the whole process, which is why it is never called that
  way here.)
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence


def resolve_nprocs(nprocs) -> int:
    """``None``/``0`` → all CPUs this process may use; negative → all but ``|n|-1``."""
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        ncpu = os.cpu_count() or 1
    if nprocs is None or nprocs == 0:
        return ncpu
    nprocs = int(nprocs)
    if nprocs < 0:
        return max(1, ncpu + 1 + nprocs)
    return nprocs


@contextlib.contextmanager
def single_threaded_blas():
    """BLAS/OpenMP (numpy, scipy, torch) limited to one thread inside the block.

    DIPY's denoisers are much slower with multi-threaded BLAS on small matrices
    (MP-PCA: docs/preprocessing.md, "Threads and processes"), and our own workers bring their own
    parallelism.
    """
    from threadpoolctl import threadpool_limits

    torch_threads = None
    try:
        import sys

        if "torch" in sys.modules:
            import torch

            torch_threads = torch.get_num_threads()
            torch.set_num_threads(1)
    except Exception:  # pragma: no cover - torch broken or absent
        torch_threads = None
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        if torch_threads is not None:
            import torch

            torch.set_num_threads(torch_threads)


def thread_map(func: Callable, items: Sequence, nprocs: int = 1) -> list:
    """``[func(x) for x in items]`` on ``nprocs`` threads (order kept)."""
    items = list(items)
    nprocs = max(1, min(resolve_nprocs(nprocs), len(items) or 1))
    if nprocs == 1:
        return [func(x) for x in items]
    with ThreadPoolExecutor(max_workers=nprocs) as pool:
        return list(pool.map(func, items))


def _mp_context():
    """An explicit start-method context (the global start method is left alone).

    ``fork`` where it exists (Linux): no re-import of the caller's ``__main__``
    (``forkserver``/``spawn`` re-run an unguarded script) and no start-up
    cost. The parent's BLAS/OpenMP pools are idle when the pool starts and the
    workers run single-threaded. ``BIDS_ADHD_MP_CONTEXT=forkserver`` (or
    ``spawn``) overrides this.
    """
    methods = mp.get_all_start_methods()
    wanted = os.environ.get("BIDS_ADHD_MP_CONTEXT", "fork")
    if wanted not in methods:
        wanted = "forkserver" if "forkserver" in methods else methods[0]
    return mp.get_context(wanted)


def _init_worker():
    # One BLAS thread per worker process; set before numpy does any work.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1)
    except Exception:  # pragma: no cover
        pass


def process_imap(func: Callable, items: Iterable, nprocs: int = 1, chunksize: int = 1) -> Iterator:
    """``func(x) for x in items`` in ``nprocs`` worker processes, yielded in order as they finish.

    Lazy on purpose: the caller stores each result and drops it before the next arrives, so
    the results are never all held at once (the motion step's resampled volumes were: one
    copy of the whole series, 730 MB at HBN size). ``func`` must be a module-level function
    (it is pickled by reference). With ``nprocs == 1`` everything runs in this process.
    """
    items = list(items)
    nprocs = max(1, min(resolve_nprocs(nprocs), len(items) or 1))
    if nprocs > 1 and mp.current_process().daemon:
        # a daemonic worker (e.g. of a multiprocessing.Pool) may not have children:
        # threads instead (DIPY's registration releases the GIL only in parts)
        with ThreadPoolExecutor(max_workers=nprocs) as pool:
            yield from pool.map(func, items)
        return
    if nprocs == 1:
        for x in items:
            yield func(x)
        return
    ctx = _mp_context()
    with ctx.Pool(nprocs, initializer=_init_worker) as pool:
        yield from pool.imap(func, items, chunksize=chunksize)

"""Nipype's SLURMGraph plugin, made to behave like the others: block until done.

Nipype's graph plugins (SLURMGraph, SGEGraph) submit one sbatch job per node, chained
with --dependency=afterok, and return as soon as everything is submitted. They ignore
status_callback. So ``run_participant`` tags every job with a unique ``--comment``,
waits here until no job with that tag is left in the queue, cancels jobs whose
dependency failed (they would wait forever where the cluster does not set
kill_invalid_depend), and leaves it to the caller to check the outputs.
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import time
import uuid

from ..errors import DataError, UsageError

LOG = logging.getLogger("bids_adhd.participant")
#: extra sbatch arguments for every node job (partition, account, time, memory)
ENV_SBATCH_ARGS = "BIDS_ADHD_SBATCH_ARGS"


def slurm_plugin_args(nthreads: int) -> tuple[str, dict]:
    """(tag, plugin_args) for ``wf.run(plugin="SLURMGraph", plugin_args=...)``."""
    for exe in ("sbatch", "squeue"):
        if shutil.which(exe) is None:
            raise UsageError(f"--nipype-plugin SLURMGraph needs Slurm's {exe} on PATH (run it on a "
                             "submit host, not inside the container)")
    tag = f"bids_adhd-{uuid.uuid4().hex[:12]}"
    extra = os.environ.get(ENV_SBATCH_ARGS, "")
    sbatch_args = f"--comment={tag} --cpus-per-task={nthreads} --export=ALL {extra}".strip()
    # dont_resubmit_completed_jobs: a re-run submits only what is not in the work dir yet.
    # Each job runs `sys.executable pyscript.py` (this interpreter: the venv's or the image's).
    return tag, {"sbatch_args": sbatch_args, "dont_resubmit_completed_jobs": True}


def _queue(tag: str) -> list[tuple[str, str, str]]:
    proc = subprocess.run(["squeue", "-h", "-o", "%i|%k|%T|%r"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise DataError(f"squeue failed while waiting for the Slurm jobs: {proc.stderr.strip()[:200]}")
    jobs = []
    for line in proc.stdout.splitlines():
        job, comment, state, reason = (line.split("|") + ["", "", "", ""])[:4]
        if comment.strip() == tag:
            jobs.append((job.strip(), state.strip(), reason.strip()))
    return jobs


def wait_for_jobs(tag: str, poll_s: float = 2.0, timeout_s: float | None = None) -> int:
    """Block until no job tagged ``tag`` is queued or running; return how many were cancelled."""
    t0, cancelled, seen = time.monotonic(), 0, 0
    while True:
        jobs = _queue(tag)
        if not jobs:
            LOG.info("Slurm jobs %s: all finished after %.0f s", tag, time.monotonic() - t0)
            return cancelled
        seen = max(seen, len(jobs))
        dead = [j for j, state, reason in jobs if state == "PENDING" and "DependencyNeverSatisfied" in reason]
        if dead:
            subprocess.run(["scancel", *dead], capture_output=True, timeout=60)
            cancelled += len(dead)
            LOG.warning("cancelled %d Slurm job(s) whose dependency failed", len(dead))
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            subprocess.run(["scancel", *[j for j, _, _ in jobs]], capture_output=True, timeout=60)
            raise DataError(f"Slurm jobs {tag} did not finish in {timeout_s:.0f} s; cancelled")
        time.sleep(poll_s)

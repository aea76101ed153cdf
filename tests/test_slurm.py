"""Slurm: a REAL one-node cluster on this machine (ci/setup-slurm.sh: slurm-wlm + munge).

* the cluster answers: ``srun hostname``, ``sbatch --wait``;
* scripts/slurm_participant_array.sh: syntax, its participant selection by
  SLURM_ARRAY_TASK_ID (dry runs), and a real ``sbatch --array`` of it with a stand-in
  for apptainer that records what each task would run;
* ``--nipype-plugin SLURMGraph``: a 2-subject participant level submitted as one Slurm
  job per Nipype node returns only when every job has finished, and its outputs equal
  the MultiProc run's (same files; NIfTI, JSON and TSV compared numerically).

As root, the fixture installs and starts the cluster (idempotent, seconds when it is up);
otherwise the Slurm tests are skipped unless a cluster already answers.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_adhd import derivatives as dv

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "ci" / "setup-slurm.sh"
ARRAY = ROOT / "scripts" / "slurm_participant_array.sh"
SMOKE_PIPELINE = ROOT / "ci" / "smoke-pipeline.yaml"


@pytest.fixture(scope="module")
def slurm():
    if subprocess.run(["bash", str(SETUP), "--check"], capture_output=True).returncode == 0:
        return True
    if os.geteuid() != 0:
        pytest.skip("no Slurm cluster answers and setting one up needs root (sudo bash ci/setup-slurm.sh)")
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"ci/setup-slurm.sh failed:\n{proc.stdout}\n{proc.stderr}"
    print(f"Slurm cluster set up in {time.perf_counter() - t0:.1f} s")
    return True


def _cancel_jobs_under(path: Path) -> None:
    """Leave no job behind whose script lives under ``path`` (a failed test's leftovers)."""
    proc = subprocess.run(["squeue", "-h", "-o", "%i|%o"], capture_output=True, text=True)
    ids = [ln.split("|")[0] for ln in proc.stdout.splitlines() if str(path) in ln]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


# --------------------------------------------------------------------------- the cluster itself
def test_srun_and_sbatch_wait(slurm, tmp_path):
    host = subprocess.run(["srun", "-N1", "-n1", "hostname"], capture_output=True, text=True, timeout=120)
    assert host.returncode == 0, host.stderr
    assert host.stdout.strip().split(".")[0] == socket.gethostname().split(".")[0]
    out = tmp_path / "job.out"
    job = subprocess.run(["sbatch", "--wait", "-o", str(out), "--wrap",
                          'echo "job $SLURM_JOB_ID on $SLURMD_NODENAME with $SLURM_CPUS_ON_NODE CPUs"'],
                         capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stderr
    assert out.read_text().startswith("job ")


# --------------------------------------------------------------------------- the array recipe
def _participants(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "participants.tsv").write_text(text)
    return folder


def _array(env: dict, *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(["bash", str(ARRAY), *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=60)


def test_array_script_syntax():
    assert subprocess.run(["bash", "-n", str(ARRAY)], capture_output=True).returncode == 0
    assert os.access(ARRAY, os.X_OK)


def test_array_script_selects_one_participant_per_task(tmp_path):
    # participant_id not first, CRLF line ends, a blank line, labels with and without 'sub-'
    bids = _participants(tmp_path / "bids", "age\tparticipant_id\tdiagnosis\r\n11\tsub-01\tADHD\r\n"
                                            "9\tsub-02\tTD\r\n\r\n10\t03\tTD\r\n")
    env = {"BIDS_ADHD_X": "1", "BIDS_DIR": str(bids), "OUT_DIR": "/project/out", "SIF": "/images/app.sif",
           "WORK_ROOT": "/scratch/w", "SLURM_CPUS_PER_TASK": "4", "APPTAINER": "apptainer"}
    assert _array(env, "--array-range").stdout.strip() == "1-3"
    for task, label in ((1, "01"), (2, "02"), (3, "03")):
        proc = _array({**env, "SLURM_ARRAY_TASK_ID": str(task)}, "--dry-run", "--pipeline", "fast")
        assert proc.returncode == 0, proc.stderr
        cmd = proc.stdout.split()
        assert cmd[:2] == ["apptainer", "run"] and "--containall" in cmd
        assert cmd[cmd.index("--participant-label") + 1] == label
        assert f"/scratch/w/sub-{label}:/work" in cmd
        assert cmd[cmd.index("--nprocs") + 1] == "4"
        assert cmd[-2:] == ["--pipeline", "fast"]
        assert "/images/app.sif" in cmd and f"{bids}:/data:ro" in cmd
    assert _array({**env, "SLURM_ARRAY_TASK_ID": "4"}, "--dry-run").returncode == 64
    assert _array({**env, "SLURM_ARRAY_TASK_ID": "0"}, "--dry-run").returncode == 64
    no_column = _participants(tmp_path / "bad", "subject\tage\nsub-01\t9\n")
    assert _array({**env, "BIDS_DIR": str(no_column), "SLURM_ARRAY_TASK_ID": "1"}, "--dry-run").returncode == 65
    assert _array({**env, "BIDS_DIR": str(tmp_path / "none"), "SLURM_ARRAY_TASK_ID": "1"}).returncode == 66


def test_array_script_under_sbatch_array(slurm, tmp_path):
    """Real array tasks: Slurm sets SLURM_ARRAY_TASK_ID; a stand-in apptainer records the command."""
    bids = _participants(tmp_path / "bids", "participant_id\tdiagnosis\nsub-01\tADHD\nsub-02\tTD\n")
    fake = tmp_path / "apptainer"
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$RECORD_DIR/task-$SLURM_ARRAY_TASK_ID.args"\n')
    fake.chmod(0o755)
    (tmp_path / "records").mkdir()
    env = {**os.environ, "BIDS_DIR": str(bids), "OUT_DIR": str(tmp_path / "out"), "SIF": "/images/app.sif",
           "WORK_ROOT": str(tmp_path / "work"), "APPTAINER": str(fake), "RECORD_DIR": str(tmp_path / "records")}
    rng = _array(env, "--array-range").stdout.strip()
    try:
        job = subprocess.run(["sbatch", "--wait", f"--array={rng}", "--cpus-per-task=1", "--mem=100M",
                              "-o", str(tmp_path / "task-%a.log"), str(ARRAY)],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        _cancel_jobs_under(tmp_path)
    logs = {p.name: p.read_text() for p in tmp_path.glob("task-*.log")}
    assert job.returncode == 0, (job.stderr, logs)
    for task, label in ((1, "01"), (2, "02")):
        args = (tmp_path / "records" / f"task-{task}.args").read_text().split("\n")
        assert args[args.index("--participant-label") + 1] == label
        assert args[args.index("--nprocs") + 1] == "1"
        assert (tmp_path / "work" / f"sub-{label}").is_dir()


# --------------------------------------------------------------------------- SLURMGraph vs MultiProc
def _participant(bids: Path, out: Path, work: Path, plugin: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bids_adhd", str(bids), str(out), "participant",
                           "--pipeline", str(SMOKE_PIPELINE), "--skip-bids-validation", "--nipype-plugin", plugin,
                           "--nprocs", "2", "--omp-nthreads", "1", "--work-dir", str(work)],
                          capture_output=True, text=True, timeout=1800)
    return proc, time.perf_counter() - t0


def _derivative_files(root: Path) -> list[str]:
    """Every output under sub-*/ (the per-subject derivatives), relative to root."""
    return sorted(str(p.relative_to(root)) for p in root.glob("sub-*/**/*")
                  if p.is_file() and p.relative_to(root).parts[1:2] != ("log",))  # logs: named per run


def _same_json(a, b, path="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _same_json(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _same_json(x, y, f"{path}[{i}]")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return [] if math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-8) or (a != a and b != b) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _compare(a: Path, b: Path) -> list[str]:
    problems = []
    for rel in _derivative_files(a):
        fa, fb = a / rel, b / rel
        if rel.endswith((".nii.gz", ".nii")):
            ia, ib = nib.load(fa), nib.load(fb)
            if ia.shape != ib.shape or not np.allclose(ia.affine, ib.affine, atol=1e-6):
                problems.append(f"{rel}: shape/affine differ")
                continue
            xa = np.asanyarray(ia.dataobj).astype(np.float64)
            xb = np.asanyarray(ib.dataobj).astype(np.float64)
            if not np.allclose(xa, xb, rtol=1e-5, atol=1e-6, equal_nan=True):
                problems.append(f"{rel}: max |diff| {np.nanmax(np.abs(xa - xb)):.3g}")
        elif rel.endswith(".json"):
            problems += [f"{rel}{d}" for d in _same_json(json.loads(fa.read_text()), json.loads(fb.read_text()))]
        elif rel.endswith((".tsv", ".bval", ".bvec", ".txt")):
            ta, tb = fa.read_text().split(), fb.read_text().split()
            if len(ta) != len(tb):
                problems.append(f"{rel}: {len(ta)} != {len(tb)} fields")
                continue
            for x, y in zip(ta, tb, strict=True):
                try:
                    same = math.isclose(float(x), float(y), rel_tol=1e-5, abs_tol=1e-8) or (x == y)
                except ValueError:
                    same = x == y
                if not same:
                    problems.append(f"{rel}: {x} != {y}")
                    break
        elif rel.endswith(".html") or "/figures/" in rel:
            continue  # reports: presence is checked by the file lists
        elif fa.read_bytes() != fb.read_bytes():
            problems.append(f"{rel}: bytes differ")
    return problems


def test_slurmgraph_outputs_equal_multiproc(slurm, tmp_path, tiny_bids):
    mp_out, sl_out = tmp_path / "multiproc", tmp_path / "slurmgraph"
    mp, mp_s = _participant(tiny_bids, mp_out, tmp_path / "work-mp", "MultiProc")
    assert mp.returncode == 0, mp.stderr[-3000:]
    try:
        sl, sl_s = _participant(tiny_bids, sl_out, tmp_path / "work-sl", "SLURMGraph")
        # the command must return only when every job is done: nothing of ours still queued
        queued = subprocess.run(["squeue", "-h", "-o", "%i|%o"], capture_output=True, text=True).stdout
        leftover = [ln for ln in queued.splitlines() if str(tmp_path) in ln]
    finally:
        _cancel_jobs_under(tmp_path)
    print(f"participant level, 2 subjects: MultiProc {mp_s:.1f} s, SLURMGraph {sl_s:.1f} s")
    assert sl.returncode == 0, sl.stderr[-3000:]
    assert not leftover, ("bids_adhd returned while its Slurm jobs were still queued: run.py must wait for "
                          f"the SLURMGraph jobs (docs/deploy.md, Slurm):\n{leftover}")
    batch = list((tmp_path / "work-sl").rglob("batchscript_*.sh"))
    assert batch, "no sbatch script: the nodes did not go through Slurm"
    assert list((tmp_path / "work-sl").rglob("batchscript_*.sh.o")), "no job output: no job ran"
    for sub in ("01", "02"):
        for f in dv.participant_outputs(sl_out, dv.Source(subject=sub)):
            assert f.is_file(), f"{f} missing after SLURMGraph returned"
        assert dv.report_html(sl_out, sub).is_file()
    assert _derivative_files(sl_out) == _derivative_files(mp_out)
    assert sorted(p.name for p in sl_out.glob("*.html")) == sorted(p.name for p in mp_out.glob("*.html"))
    problems = _compare(mp_out, sl_out)
    assert not problems, "\n".join(problems[:20])


def test_array_tasks_validate_their_own_subject_by_default(tmp_path):
    """A task validates only its subject and the top-level files (cheap): on by default."""
    bids = _participants(tmp_path / "bids", "participant_id\nsub-01\n")
    env = {"BIDS_DIR": str(bids), "OUT_DIR": "/o", "SIF": "/a.sif", "SLURM_ARRAY_TASK_ID": "1"}
    assert "--skip-bids-validation" not in _array(env, "--dry-run").stdout.split()
    assert "--skip-bids-validation" in _array({**env, "SKIP_VALIDATION": "1"}, "--dry-run").stdout.split()

"""The group level under ``torchrun``: 2 CPU processes (gloo, DDP) give what one process gives.

* ``test_two_ranks_match_one_process``: the same tiny group run (the tiny
  stand-in encoder of ``test_group_common``, 8 simulated subjects, 2 folds + the
  final model) once with ``python`` and once with ``torchrun --standalone
  --nproc-per-node 2``. Exit 0; the same ``folds.tsv`` byte for byte; the same
  set of output files, each written once, by rank 0 (rank 1 logs nothing but
  errors); probabilities, training and validation losses equal within 1e-4; the
  same early-stopping decisions; no process left behind.
* ``test_bad_input_stops_both_ranks``: a wrong ``--label-column`` under
  ``torchrun -m bids_adhd``: every rank prints the one-line error and exits 65
  (torchrun's summary lists both), well within the timeout.
* ``test_error_on_rank0_only_stops_rank1``: OUTPUT_DIR/group is a file, which
  only rank 0 (the writer) finds out: rank 1 does not hang, both exit 73.
* ``test_batch_split_is_distributed_samplers``: the per-rank split of a batch.
* ``test_participant_level_refuses_torchrun``: the participant level is one process (exit 64).

Tolerance: the test pipeline uses ``norm_mode: recalibrate`` (BatchNorm in eval
mode while training), so one process and two compute the same loss and
gradient mathematically (the global batch of 3 is split 2 + 1 plus a
zero-weight pad, each rank's loss is its share of the global class-weighted
mean and DDP averages). What differs is float32 rounding: the gradient is a sum
of two half-batch sums instead of one, convolutions run on batches of another
size. That is about 1e-7 relative per step; after the 3 + 20 head steps and a
few AdamW steps it stays far below 1e-4 (measured: below the 1e-6 resolution of
the TSV files), while a wrong split, weighting or an unsynchronised rank moves
the losses by 1e-3 and more.
With ``norm_mode: train`` each rank normalises with its own half batch on the
CPU (SyncBatchNorm only on CUDA), and results differ more: not compared here.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_group_common import runner_script, synthetic, tiny_pipeline

from bids_adhd.workflows.run import _THREAD_VARS

#: the tiny group runner of test_group_common, plus a line on stderr for every training forward pass
#: (the batch size that process saw): shows that the ranks split the batches
RUNNER = """
import sys
sys.path.insert(0, {tests!r})
import torch
import test_group_common as c
import bids_adhd.learn.classifier as classifier


def build_model(cfg, weights=None, **kw):
    model, info = c.tiny_build_model(cfg, weights, **kw)

    def seen(module, args):
        if module.training and torch.is_grad_enabled():
            print("TRAIN_BATCH", args[0].shape[0], file=sys.stderr, flush=True)
    model.register_forward_pre_hook(seen)
    return model, info


classifier.build_model = build_model
from bids_adhd.cli import main
raise SystemExit(main(sys.argv[1:]))
"""
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed beside python")
TOL = 1e-4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    bids, out, _ = synthetic(root, n=8)
    pipe = tiny_pipeline(root, epochs=3, patience=10, folds=2, batch_size=3, lr=0.01,
                         norm_mode="recalibrate")
    return root, bids, out, pipe


def _run(cmd, timeout, env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run in a new session; on timeout kill the whole session (torchrun's ranks have their own).

    Without ``env``: this process's environment without the BLAS/OpenMP thread counts, as in a
    user's shell, so that torchrun gives each rank one thread (it sets ``OMP_NUM_THREADS`` only where
    unset; with 2 threads per rank, inherited from an earlier test, the probabilities moved by 1.5e-4)."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if k not in _THREAD_VARS}
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in _pids_with(str(cwd)) if cwd else []:       # the ranks (their own sessions)
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s (hang?): {err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _pids_with(text: str) -> list[int]:
    """Processes whose command line or working directory mentions ``text``."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(p / "cwd")
        except OSError:
            continue
        if text in cmd or cwd.startswith(text):
            found.append(int(p.name))
    return found


def _no_leftovers(text: str) -> None:
    t0 = time.time()
    while _pids_with(text) and time.time() - t0 < 10:
        time.sleep(0.2)
    assert not _pids_with(text), f"processes left behind: {_pids_with(text)}"


def _torchrun(*args, log_dir: Path):
    return [TORCHRUN, "--standalone", "--nproc-per-node", "2", "--log-dir", log_dir, "--redirects", "3", *args]


def _rank_logs(log_dir: Path) -> dict[int, str]:
    """Each rank's stderr (torchrun --log-dir DIR --redirects 3: DIR/<run>/attempt_0/<rank>/stderr.log)."""
    logs = {int(p.parent.name): p.read_text() for p in log_dir.rglob("stderr.log")}
    assert sorted(logs) == [0, 1], sorted(logs)
    return logs


def _exit_codes(summary: str) -> list[int]:
    return [int(line.split(":")[1].split()[0]) for line in summary.splitlines() if line.strip().startswith("exitcode")]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _tsv(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, ln.split("\t"))) for ln in lines[1:]]


def _batches(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"TRAIN_BATCH (\d+)\n", log)]     # amid rank 0's progress bars


def test_two_ranks_match_one_process(data, tmp_path):
    root, bids, maps, pipe = data
    script = tmp_path / "run_tiny_batches.py"
    script.write_text(RUNNER.format(tests=str(Path(__file__).parent)))
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(maps, one)
    shutil.copytree(maps, two)
    common = ["group", "--pipeline", pipe, "--skip-bids-validation"]

    t0 = time.time()
    single = _run([sys.executable, script, bids, one, *common, "--nprocs", "1", "-q"], timeout=300, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    t1 = time.time()
    logs_dir = tmp_path / "logs"
    ddp = _run(_torchrun(script, bids, two, *common, log_dir=logs_dir), timeout=300, cwd=tmp_path)
    t2 = time.time()
    assert ddp.returncode == 0, ddp.stderr[-3000:] + "".join(_rank_logs(logs_dir).values())[-3000:]
    print(f"one process {t1 - t0:.0f} s, torchrun x2 {t2 - t1:.0f} s")
    _no_leftovers(str(tmp_path))

    # logs: rank 0 reports (once), rank 1 stays silent (no errors, no INFO duplicates)
    logs = _rank_logs(logs_dir)
    assert "torchrun: 2 processes, backend gloo" in logs[0]
    assert "fold assignment identical on all 2 ranks" in logs[0]
    assert logs[0].count("group level finished") == 1
    assert "INFO" not in logs[1] and "WARNING" not in logs[1] and "error" not in logs[1].lower(), logs[1][-2000:]
    # the same steps, each global batch of n split into ceil(n / 2) per rank (padding included)
    single_batches = _batches(single.stderr)
    assert single_batches and max(single_batches) == 3
    assert _batches(logs[0]) == _batches(logs[1]) == [-(-n // 2) for n in single_batches]

    g1, g2 = one / "group", two / "group"
    # the same fold assignment (every rank computed it; rank 0 wrote it)
    assert (g1 / "folds.tsv").read_bytes() == (g2 / "folds.tsv").read_bytes()
    # the same outputs, once each (TensorBoard event files are named after host, pid and time: compare
    # their folders, one file each, written by rank 0)
    def named(files):
        return sorted(f.rsplit("/", 1)[0] + "/<events>" if "tfevents" in f else f for f in files)
    assert named(_files(g1)) == named(_files(g2))
    assert not (g2 / "checkpoints").exists() and not [p for p in g2.rglob(".*") if ".tmp" in p.name]
    c1, c2 = json.loads((g1 / "config.json").read_text()), json.loads((g2 / "config.json").read_text())
    assert c1["subjects"] == c2["subjects"] and c1["pipeline"] == c2["pipeline"]
    assert c1["processes"] == 1 and c2["processes"] == 2

    # metrics: present, comparable
    m1, m2 = json.loads((g1 / "metrics.json").read_text()), json.loads((g2 / "metrics.json").read_text())
    assert m2["timing"]["processes"] == 2 and m1["timing"]["processes"] == 1
    assert m1["pooled"]["n"] == m2["pooled"]["n"] == 8
    p1 = {r["participant_id"]: float(r["probability"]) for r in _tsv(g1 / "predictions.tsv")}
    p2 = {r["participant_id"]: float(r["probability"]) for r in _tsv(g2 / "predictions.tsv")}
    assert p1.keys() == p2.keys()
    worst = max(abs(p1[s] - p2[s]) for s in p1)
    assert worst <= TOL, (p1, p2)
    worst_loss = 0.0
    for name in ("fold-1", "fold-2", "final"):
        h1, h2 = _tsv(g1 / name / "training_log.tsv"), _tsv(g2 / name / "training_log.tsv")
        assert [(r["stage"], r["epoch"]) for r in h1] == [(r["stage"], r["epoch"]) for r in h2]
        for r1, r2 in zip(h1, h2):
            for key in ("train_loss", "val_loss", "val_auc"):
                assert abs(float(r1[key]) - float(r2[key])) <= TOL, (name, key, r1, r2)
                worst_loss = max(worst_loss, abs(float(r1[key]) - float(r2[key])))
        losses = [float(r["train_loss"]) for r in h1 if r["stage"] == "finetune"]
        assert max(losses) - min(losses) > 10 * TOL, f"{name}: the fine-tuning did not move ({losses})"
    for f1, f2 in zip(sorted(m1["folds"], key=lambda f: f["fold"]), sorted(m2["folds"], key=lambda f: f["fold"])):
        assert f1["n"] == f2["n"]
    for name in ("fold-1", "fold-2"):
        d1, d2 = (json.loads((g / name / "metrics.json").read_text()) for g in (g1, g2))
        assert (d1["best_epoch"], d1["epochs_run"], d1["stopped_early"]) == \
            (d2["best_epoch"], d2["epochs_run"], d2["stopped_early"])
        assert d1["inner_train"] == d2["inner_train"] and d1["inner_val"] == d2["inner_val"]
    print(f"largest difference: probability {worst:.2g}, logged loss/AUC {worst_loss:.2g}")


def test_batch_split_is_distributed_samplers():
    """Rank r takes items r, r+W, ... of the global batch, padded with zero-weight copies."""
    from bids_adhd.learn.distributed import Dist

    assert Dist().shard([5, 1, 7]) == ([5, 1, 7], [1.0, 1.0, 1.0])
    two = [Dist(r, 2).shard([5, 1, 7]) for r in (0, 1)]
    assert two == [([5, 7], [1.0, 1.0]), ([1, 5], [1.0, 0.0])]
    three = [Dist(r, 3).shard([5, 1], min_per_rank=2) for r in (0, 1, 2)]
    assert [i for i, _ in three] == [[5, 1], [1, 5], [5, 1]]
    assert sum(sum(k) for _, k in three) == 2                 # each real item counted once


def test_participant_level_refuses_torchrun(monkeypatch, capsys, tmp_path):
    import logging

    from bids_adhd.cli import main

    log = logging.getLogger("bids_adhd")         # main() points it at capsys's stream: restore it after
    for attr in ("handlers", "level", "propagate"):
        monkeypatch.setattr(log, attr, list(log.handlers) if attr == "handlers" else getattr(log, attr))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main([str(tmp_path), str(tmp_path / "out"), "participant"]) == 64
    assert "does not run under torchrun" in capsys.readouterr().err


def test_bad_input_stops_both_ranks(data, tmp_path):
    root, bids, maps, pipe = data
    t0 = time.time()
    proc = _run(_torchrun("-m", "bids_adhd", bids, maps, "group", "--pipeline", "fast", "--skip-bids-validation",
                          "--label-column", "dx", log_dir=tmp_path / "logs"), timeout=150, cwd=tmp_path)
    assert proc.returncode != 0                       # torchrun itself exits 1 when a rank fails
    assert _exit_codes(proc.stderr) == [65, 65], proc.stderr[-3000:]
    for rank, log in _rank_logs(tmp_path / "logs").items():
        errors = [ln for ln in log.splitlines() if ln.startswith("bids_adhd: error:")]
        assert len(errors) == 1 and "no column 'dx'" in errors[0], (rank, log[-2000:])
        assert "Traceback" not in log, (rank, log[-2000:])
    assert time.time() - t0 < 150
    _no_leftovers(str(tmp_path))
    assert not (maps / "group").exists()


def test_error_on_rank0_only_stops_rank1(data, tmp_path):
    """Only rank 0 creates OUTPUT_DIR/group: its error (73) reaches rank 1, which exits 73 too."""
    root, bids, maps, pipe = data
    out = tmp_path / "out"
    shutil.copytree(maps, out)
    (out / "group").write_text("not a folder")
    script = runner_script(tmp_path)
    proc = _run(_torchrun(script, bids, out, "group", "--pipeline", pipe, "--skip-bids-validation", "-q",
                          log_dir=tmp_path / "logs"), timeout=150, cwd=tmp_path)
    assert proc.returncode != 0
    assert _exit_codes(proc.stderr) == [73, 73], proc.stderr[-3000:]
    for rank, log in _rank_logs(tmp_path / "logs").items():
        errors = [ln for ln in log.splitlines() if ln.startswith("bids_adhd: error:")]
        assert len(errors) == 1 and "OUTPUT_DIR/group" in errors[0], (rank, log[-2000:])
        assert "Traceback" not in log, (rank, log[-2000:])
    _no_leftovers(str(tmp_path))

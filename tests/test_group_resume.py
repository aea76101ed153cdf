"""A group run killed with SIGKILL mid-training resumes with --resume and finishes with the same folds."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from test_group_common import runner_script, synthetic, tiny_pipeline


def _start(script, bids, out, pipe, *extra):
    return subprocess.Popen([sys.executable, str(script), str(bids), str(out), "group", "--pipeline", str(pipe),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


NO_STATS = ("--no-saliency", "--permutations", "0", "--confounds", "none")


def test_killed_run_resumes(tmp_path):
    bids, out, _ = synthetic(tmp_path, n=8)
    pipe = tiny_pipeline(tmp_path, epochs=6, patience=10, folds=2, norm_mode="recalibrate")
    script = runner_script(tmp_path, sleep=0.25)
    group = out / "group"
    # the statistics (saliency, permutations, confounds) have their own tests (test_group_stats.py,
    # and the kill chain in test_group_faults.py resumes with them on); off here, where time is bounded
    proc = _start(script, bids, out, pipe, "-q", *NO_STATS)
    ckpt = group / "checkpoints" / "fold-2" / "last.pt"
    t0 = time.time()
    try:
        while not ckpt.exists():                       # fold 1 done, fold 2 has a checkpoint: kill it
            assert proc.poll() is None, proc.communicate()
            assert time.time() - t0 < 240, "no checkpoint appeared"
            time.sleep(0.2)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (group / "metrics.json").exists()
    folds_before = (group / "folds.tsv").read_text()
    fold1 = (group / "fold-1" / "metrics.json").read_text()
    epoch_killed = len([ln for ln in (group / "fold-2" / "training_log.tsv").read_text().splitlines()[1:]
                        if ln.startswith("finetune")])

    resumed = _start(script, bids, out, pipe, "--resume", *NO_STATS)
    _, err = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, err[-2000:]
    assert "fold 1/2: finished in the interrupted run; skipped" in err
    assert "fold-2: resuming after epoch" in err
    assert (group / "folds.tsv").read_text() == folds_before
    assert (group / "fold-1" / "metrics.json").read_text() == fold1
    metrics = json.loads((group / "metrics.json").read_text())
    assert metrics["pooled"]["n"] == 8 and len(metrics["folds"]) == 2
    log2 = (group / "fold-2" / "training_log.tsv").read_text().splitlines()[1:]
    epochs = [int(ln.split("\t")[1]) for ln in log2 if ln.startswith("finetune")]
    assert epochs == sorted(set(epochs)) and epochs[0] == 1 and len(epochs) >= epoch_killed
    assert (group / "final" / "adapter.safetensors").is_file()
    assert not (group / "checkpoints").exists()
    leftovers = [p for p in group.rglob(".*") if ".tmp" in p.name]
    assert not leftovers

    # the saved assignment is the one the seed gives (what an uninterrupted run uses)
    from bids_adhd.bids import read_participants
    from bids_adhd.learn.crossval import assign_folds, read_folds

    rows = read_participants(bids)
    subs = sorted(r["participant_id"][4:] for r in rows)
    labels = {r["participant_id"][4:]: int(r["diagnosis"] == "ADHD") for r in rows}
    saved, _ = read_folds(group / "folds.tsv", ("TD", "ADHD"))
    assert saved == assign_folds(subs, [labels[s] for s in subs], 2, seed=0)

"""One demo subject through the participant level, per preset: wall/CPU time and per-step timings.

Simulates a 2-subject demo dataset (``bids_adhd simulate --size demo``; seed ``--seed``), then
runs ``bids_adhd BIDS OUT participant --participant-label 01 --pipeline P --nprocs N`` in a
subprocess for every ``--pipeline`` (fresh output and work dirs each), records wall time, CPU
time (user + sys of the process tree), the load average, and the per-step times the workflow
logs ("<node> done in X s"). The issue's target: well under a minute on 2 cores.

Writes ``benchmarks/results/participant_subject.json``. Run from the repository root:
    .venv/bin/python benchmarks/participant_subject.py --pipeline fast default
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from group_demo import step      # wall/CPU time and load average of one CLI subprocess

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "participant_subject.json"
STEP = re.compile(r"INFO (\S+)\s+done in ([0-9.]+) s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", nargs="+", default=["fast", "default"])
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    py = sys.executable
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([py, "-m", "bids_adhd", "simulate", str(tmp / "bids"), "--subjects", "2", "--seed",
                        str(args.seed), "--size", "demo"], check=True, capture_output=True, cwd=ROOT)
        for name in args.pipeline:
            out, work = tmp / f"out-{name}", tmp / f"work-{name}"
            log = tmp / f"participant-{name}.log"
            run = step(f"participant --pipeline {name}",
                       [py, "-m", "bids_adhd", str(tmp / "bids"), str(out), "participant", "--participant-label",
                        "01", "--pipeline", name, "--nprocs", str(args.nprocs), "--work-dir", str(work)], log)
            if run["exit"]:
                return run["exit"]
            run["steps_s"] = {m.group(1): float(m.group(2)) for m in STEP.finditer(log.read_text())}
            runs.append({"pipeline": name, **run})
            shutil.rmtree(work, ignore_errors=True)
    res = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "subject": "sub-01 of a 2-subject "
           f"--size demo dataset, seed {args.seed} (64x76x64 voxels, 33 volumes, 2.5 mm)", "nprocs": args.nprocs,
           "cpu_count": os.cpu_count(), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

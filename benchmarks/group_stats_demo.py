"""Issue 13's must-show runs: the README demo path on a seed no setting was chosen on, with and without
the planted effect, and a dataset with a motion-diagnosis confound.

For each case: ``bids_adhd simulate`` (20 subjects, ``--seed``, demo size), the participant level
(``--pipeline fast --nprocs N``), the group level (``--pipeline fast``, default statistics), each
through the command line in a subprocess (``--reuse`` keeps existing data and participant outputs).
Cases: ``effect`` (8 % effect), ``null`` (``--effect 0``), ``motion`` (8 % effect and
``--motion-confound 2``: ADHD subjects move 3x as much).

Recorded per case from ``group/metrics.json``: pooled AUC with its 95 % CI (and whether the CI holds
the estimate and lies above 0.5), balanced accuracy / sensitivity / specificity / Brier with CIs,
the permutation p-value and null summary, the thresholds, the confound-only AUCs (+ CI, flagged),
the saliency's inside-effect / WM-outside ratio, the statistics' own cost (frozen features,
permutations, saliency per fold, everything after the folds) and the step timings with the load
average before and after (the machine may be shared).

    .venv/bin/python benchmarks/group_stats_demo.py                  # ~20 min per case on 2 idle cores
    .venv/bin/python benchmarks/group_stats_demo.py --cases motion --reuse

Writes ``benchmarks/results/group_stats_demo.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "group_stats_demo.json"
CASES = {"effect": ["--effect", "0.08"], "null": ["--effect", "0"],
         "motion": ["--effect", "0.08", "--motion-confound", "2"]}


def _git(*a: str) -> str:
    return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def step(name: str, cmd: list[str]) -> dict:
    load0 = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out = {"step": name, "exit": proc.returncode, "wall_s": time.perf_counter() - t0, "cpu_s": cpu,
           "load_before": load0, "load_after": os.getloadavg()[0], "command": " ".join(cmd)}
    print(f"  {name}: exit {proc.returncode}, {out['wall_s']:.0f} s wall, {cpu:.0f} s CPU "
          f"(load {load0:.1f} -> {out['load_after']:.1f})", flush=True)
    return out


def summary(metrics: dict) -> dict:
    pooled = metrics["pooled"]
    perm = dict(metrics.get("permutation") or {})
    if perm.get("null_auc"):
        perm["null_auc"] = {k: v for k, v in perm["null_auc"].items() if k != "values"}
    ci = pooled.get("auc_ci95")
    sal = metrics.get("saliency") or {}
    return {
        "pooled": {k: pooled.get(k) for k in ("auc", "auc_ci95", "balanced_accuracy", "balanced_accuracy_ci95",
                                                "sensitivity", "sensitivity_ci95", "specificity",
                                                "specificity_ci95", "brier", "brier_ci95", "n")},
        "auc_ci_contains_estimate": bool(ci and ci[0] <= pooled["auc"] <= ci[1]),
        "auc_ci_above_chance": bool(ci and ci[0] > 0.5),
        "permutation": perm, "threshold": metrics.get("threshold"),
        "confounds": {k: (metrics.get("confounds") or {}).get(k) for k in ("alone", "flagged")},
        "saliency_effect_ratio": sal.get("effect_ratio"),
        "timing": {k: v for k, v in metrics["timing"].items() if "seconds" in k},
        "pretrained": metrics.get("pretrained"),
    }


def run_case(name: str, args, py: list[str]) -> dict:
    d = Path(args.work) / name
    bids, out = d / "bids", d / "out"
    steps = []
    if not (args.reuse and (bids / "participants.tsv").exists()):
        steps.append(step("simulate", py + ["simulate", str(bids), "--subjects", str(args.subjects), "--seed",
                                            str(args.seed), "-q", *CASES[name]]))
    steps.append(step("participant", py + [str(bids), str(out), "participant", "--pipeline", "fast", "--nprocs",
                                           str(args.nprocs), "--work-dir", str(d / "work"), "-q"]))
    steps.append(step("group", py + [str(bids), str(out), "group", "--pipeline", "fast", "-q",
                                     *args.group_args.split()]))
    res = {"case": name, "simulate_args": CASES[name], "steps": steps}
    mpath = out / "group" / "metrics.json"
    if steps[-1]["exit"] == 0 and mpath.is_file():
        res.update(summary(json.loads(mpath.read_text())))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--seed", type=int, default=11, help="simulator seed (11: no setting was chosen on it)")
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--work", default="/tmp/bids_adhd_group_stats_demo")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--group-args", default="")
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args()
    py = [sys.executable, "-m", "bids_adhd"]
    results = {"seed": args.seed, "subjects": args.subjects, "nprocs": args.nprocs, "cases": {},
               "commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain", "-uno")),
               "cpu_count": os.cpu_count(), "uptime_start": _uptime(),
               "note": "the machine may be shared: wall times depend on the load recorded per step"}
    for name in args.cases:
        print(f"case {name}:", flush=True)
        results["cases"][name] = run_case(name, args, py)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, args.out)
    results["uptime_end"] = _uptime()
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

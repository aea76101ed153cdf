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


#: metrics.json entries issue 13 asks for (dotted paths); ``missing_fields`` lists those absent or null
REQUIRED = ("cv", "pooled.auc", "pooled.auc_ci95", "pooled.balanced_accuracy_ci95", "pooled.sensitivity_ci95",
            "pooled.specificity_ci95", "pooled.brier", "pooled.brier_ci95", "pooled.ci_method",
            "permutation.n", "permutation.p_value", "permutation.null_auc", "permutation.what_is_permuted",
            "threshold.method", "threshold.folds", "threshold.final", "calibration.method",
            "calibration.reliability", "confounds.alone", "confounds.score_vs", "confounds.flagged",
            "saliency.path", "saliency.effect_ratio.ratio", "timing.statistics_seconds")


def missing_fields(metrics: dict) -> list[str]:
    out = []
    for path in REQUIRED:
        v = metrics
        for key in path.split("."):
            v = v.get(key) if isinstance(v, dict) else None
        if v is None:
            out.append(path)
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
        "missing_fields": missing_fields(metrics),
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
    res = {"case": name, "simulate_args": CASES[name], "steps": steps, "output_dir": str(out)}
    if steps[-1]["exit"] == 0:
        res.update(case_outputs(out))
    return res


def case_outputs(out: Path) -> dict:
    """summary() of OUT/group/metrics.json, and whether the report shows the confound banner."""
    mpath = out / "group" / "metrics.json"
    if not mpath.is_file():
        return {}
    res = summary(json.loads(mpath.read_text()))
    report = out / "group" / "report.html"
    flagged = res["confounds"].get("flagged") or []
    res["report_flags_confounds"] = bool(flagged) and report.is_file() and all(
        f in report.read_text(encoding="utf-8").split('<div class="banner">Confound(s) <b>', 1)[-1].split("</b>")[0]
        for f in flagged)
    return res


def _fmt(v, nd=3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x, nd) for x in v) + "]"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def write_md(results: dict, path: Path) -> None:
    """The JSON's must-show numbers as a Markdown table (benchmarks/results/group_stats_demo.md)."""
    lines = [f"# Issue 13 must-show runs (seed {results['seed']}, {results['subjects']} subjects)", "",
             f"Commit {results.get('commit')} (uncommitted changes: {results.get('dirty')}); "
             f"{results.get('cpu_count')} CPUs, shared machine: {results.get('uptime_start')} -> "
             f"{results.get('uptime_end')}.", "",
             "| case | pooled AUC [95 % CI] | CI holds AUC | CI > 0.5 | perm. p (n) | balanced acc. [CI] | Brier "
             "| saliency ratio | confounds flagged (report) | missing fields |", "|---" * 10 + "|"]
    for name, c in results["cases"].items():
        pooled, perm = c.get("pooled") or {}, c.get("permutation") or {}
        conf = c.get("confounds") or {}
        lines.append(f"| {name} | {_fmt(pooled.get('auc'))} {_fmt(pooled.get('auc_ci95'))} | "
                     f"{c.get('auc_ci_contains_estimate')} | {c.get('auc_ci_above_chance')} | "
                     f"{_fmt(perm.get('p_value'))} ({perm.get('n')}) | {_fmt(pooled.get('balanced_accuracy'))} "
                     f"{_fmt(pooled.get('balanced_accuracy_ci95'))} | {_fmt(pooled.get('brier'))} | "
                     f"{_fmt((c.get('saliency_effect_ratio') or {}).get('ratio'))} | {conf.get('flagged')} "
                     f"({c.get('report_flags_confounds')}) | {c.get('missing_fields')} |")
    lines += ["", "| case | confound alone: AUC [95 % CI] |", "|---|---|"]
    for name, c in results["cases"].items():
        alone = (c.get("confounds") or {}).get("alone") or {}
        lines.append(f"| {name} | " + "; ".join(f"{k} {_fmt(v.get('auc'))} {_fmt(v.get('auc_ci95'))}"
                                                 for k, v in alone.items()) + " |")
    lines += ["", "| case | step | exit | wall s | CPU s | load before -> after |", "|---|---|---|---:|---:|---|"]
    for name, c in results["cases"].items():
        for st in c["steps"]:
            lines.append(f"| {name} | {st['step']} | {st['exit']} | {st['wall_s']:.0f} | {st['cpu_s']:.0f} | "
                         f"{st['load_before']:.1f} -> {st['load_after']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def merge(main_json: Path, others: list[str]) -> dict:
    """The cases of ``others`` (run as separate processes) added to ``main_json``; every case re-read
    from its output directory (missing fields, report banner)."""
    results = json.loads(main_json.read_text())
    for o in others:
        extra = json.loads(Path(o).read_text())
        for name, case in extra["cases"].items():
            case["run"] = {k: extra.get(k) for k in ("commit", "dirty", "uptime_start", "uptime_end")}
            results["cases"][name] = case
    for case in results["cases"].values():
        cmd = case["steps"][-1]["command"].split()
        out = Path(case.get("output_dir") or cmd[cmd.index("group") - 1])
        case["output_dir"] = str(out)
        if case["steps"][-1]["exit"] == 0:
            case.update(case_outputs(out))
    return results


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
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="run nothing: add these result files' cases to --out, re-read every case's outputs, "
                         "write --out and its .md")
    args = ap.parse_args()
    if args.merge:
        results = merge(Path(args.out), args.merge)
        Path(args.out).write_text(json.dumps(results, indent=2))
        write_md(results, Path(args.out).with_suffix(".md"))
        print(f"wrote {args.out} and its .md")
        return 0
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
    write_md(results, Path(args.out).with_suffix(".md"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

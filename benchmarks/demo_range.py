"""The README demo's numbers as a range over fresh runs (issue 12, item 4).

Reads ``benchmarks/group_stats_demo.py`` result files (each one fresh ``effect`` run of the README
demo path: ``bids_adhd simulate --seed S``, participant and group levels with ``--pipeline fast``)
and writes ``benchmarks/results/demo_range.{json,md}``: per run the seed, the commit, the pooled
AUC with its 95 % CI and the permutation p-value; over all runs the range of each; and, for every
pair of runs on the same seed, whether their participant outputs (every NIfTI, TSV and JSON
under ``sub-*/``, the HTML reports aside: they carry dates and timings) are bit-identical and
their group metrics equal. The runs keep their output folders (``output_dir`` in each file).

    .venv/bin/python benchmarks/group_stats_demo.py --cases effect --seed 13 --work W/s13 --out W/seed13.json
    .venv/bin/python benchmarks/group_stats_demo.py --cases effect --seed 14 --work W/s14 --out W/seed14.json
    .venv/bin/python benchmarks/group_stats_demo.py --cases effect --seed 13 --work W/s13b --out W/seed13b.json
    .venv/bin/python benchmarks/demo_range.py W/seed13.json W/seed14.json W/seed13b.json
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from itertools import combinations
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "demo_range.json"
#: sidecar keys that record when or how long, not what
_VOLATILE = {"timing", "Timing", "elapsed", "date", "DateCreated", "wall_s", "cpu_s", "seconds"}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in _VOLATILE and "seconds" not in k}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def digest(path: Path) -> str:
    if path.suffix == ".json":
        return hashlib.sha256(json.dumps(_strip(json.loads(path.read_text())), sort_keys=True).encode()).hexdigest()
    data = path.read_bytes()
    if path.suffix == ".gz":             # the gzip header may carry a time stamp: compare the content
        data = gzip.decompress(data)
    return hashlib.sha256(data).hexdigest()


def participant_files(out: Path) -> dict[str, str]:
    """relative path -> digest of every participant output (NIfTI, TSV, JSON under sub-*/)."""
    files = {}
    for p in sorted(out.glob("sub-*/**/*")):
        if p.is_file() and (p.name.endswith((".nii.gz", ".nii", ".tsv", ".json", ".bval", ".bvec", ".txt"))):
            files[str(p.relative_to(out))] = digest(p)
    return files


def compare(a: dict, b: dict) -> dict:
    fa, fb = participant_files(Path(a["output_dir"])), participant_files(Path(b["output_dir"]))
    common = sorted(set(fa) & set(fb))
    differ = [f for f in common if fa[f] != fb[f]]
    ma = json.loads((Path(a["output_dir"]) / "group" / "metrics.json").read_text())
    mb = json.loads((Path(b["output_dir"]) / "group" / "metrics.json").read_text())
    return {"files": len(common), "only_in_one": sorted(set(fa) ^ set(fb)), "differ": differ,
            "bit_identical": not differ and set(fa) == set(fb),
            "pooled_equal": ma["pooled"] == mb["pooled"],
            "permutation_p_equal": ma["permutation"]["p_value"] == mb["permutation"]["p_value"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="group_stats_demo.py result files (case 'effect')")
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    runs = []
    for f in args.runs:
        r = json.loads(f.read_text())
        c = r["cases"]["effect"]
        steps = {s["step"]: s for s in c["steps"]}
        runs.append({"file": str(f), "seed": r["seed"], "subjects": r["subjects"],
                     "commit": r.get("commit_used", r["commit"]), "output_dir": c["output_dir"],
                     "auc": c["pooled"]["auc"], "auc_ci95": c["pooled"]["auc_ci95"],
                     "permutation_p": c["permutation"]["p_value"],
                     "balanced_accuracy": c["pooled"]["balanced_accuracy"],
                     "wall_s": {k: round(v["wall_s"]) for k, v in steps.items()},
                     "load": {k: [round(v.get("load_before", 0), 1), round(v.get("load_after", 0), 1)]
                              for k, v in steps.items()}})
    pairs = [{"runs": [a["file"], b["file"]], "seed": a["seed"], **compare(a, b)}
             for a, b in combinations(runs, 2) if a["seed"] == b["seed"]]
    res = {"command": " ".join(["benchmarks/demo_range.py"] + [str(a) for a in (argv or sys.argv[1:])]),
           "runs": runs, "seeds": sorted({r["seed"] for r in runs}),
           "auc_range": [min(r["auc"] for r in runs), max(r["auc"] for r in runs)],
           "auc_ci95_lower_range": [min(r["auc_ci95"][0] for r in runs), max(r["auc_ci95"][0] for r in runs)],
           "permutation_p_range": [min(r["permutation_p"] for r in runs), max(r["permutation_p"] for r in runs)],
           "same_seed_pairs": pairs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    lines = ["# README demo: fresh runs (issue 12, item 4)", "", f"`{res['command']}`", "",
             "| seed | commit | pooled AUC [95 % CI] | permutation p | balanced acc. | participant wall s (load) |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['seed']} | {r['commit'][:7]} | {r['auc']:.3f} [{r['auc_ci95'][0]:.3f}, "
                     f"{r['auc_ci95'][1]:.3f}] | {r['permutation_p']:.3f} | {r['balanced_accuracy']:.3f} | "
                     f"{r['wall_s'].get('participant')} ({r['load'].get('participant')}) |")
    lines += ["", f"AUC range {res['auc_range'][0]:.3f}–{res['auc_range'][1]:.3f}; permutation p "
                  f"{res['permutation_p_range'][0]:.3f}–{res['permutation_p_range'][1]:.3f}.", ""]
    for p in pairs:
        lines.append(f"Seed {p['seed']} twice: {p['files']} participant files compared, "
                     f"{'all bit-identical' if p['bit_identical'] else str(len(p['differ'])) + ' differ'}; "
                     f"pooled metrics equal: {p['pooled_equal']}; permutation p equal: {p['permutation_p_equal']}.")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

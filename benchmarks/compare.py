"""Compare the adaptation baselines on one dataset: metrics, trainable parameters, time, peak memory.

Each baseline is a preset behind the same command (``bids_adhd ... group
--pipeline NAME``), all on CT-FM: ``paper-ctfm`` (our flat LoRA), ``peft-lora`` (PEFT's LoRA),
``linear-probe`` (head only), ``full-finetune`` (every parameter), ``scratch``
(random init, everything trains). The presets are the paper's 2 mm / 96³ /
50-epoch configuration, meant for a GPU. ``--grid fast`` runs each of them
with the ``fast`` preset's grid, training schedule and input/pooling/norm
settings instead (a temporary YAML ``base: <baseline>`` + those sections,
only ``adaptation``/``pretrained``/``train_norm`` differ), which is what a
2-core CPU can run.

The group level runs in a subprocess per baseline (``--resume`` not used);
measured: wall and CPU time, peak resident memory of the subprocess (CPU) or
the peak GPU memory PyTorch reports (``metrics.json`` timing), trainable and
total parameters, pooled out-of-fold metrics and mean ± SD over folds.

Input: an OUTPUT_DIR with template-space maps (participant level done) and
its BIDS_DIR, or ``--synthetic N`` to write synthetic maps for N subjects.

Writes ``benchmarks/results/group_compare.json`` and ``group_compare.md``.

    .venv/bin/python benchmarks/compare.py --synthetic 20 --grid fast
    .venv/bin/python benchmarks/compare.py --bids BIDS --out OUT --grid paper --device cuda   # GPU
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
BASELINES = ("paper-ctfm", "peft-lora", "linear-probe", "full-finetune", "scratch")


def fast_variant(baseline: str, dest: Path, folds: int | None) -> Path:
    """``base: <baseline>`` with the fast preset's template/train sections and input/pooling/norm keys."""
    from bids_adhd.config import load_pipeline

    fast = load_pipeline("fast").to_dict()
    base = load_pipeline(baseline).to_dict()
    model_keys = ("pooling", "intensity", "head_norm", "head_hidden", "head_dropout", "channels")
    doc = {"base": baseline, "description": f"{baseline} on the fast preset's grid and schedule (benchmarks/compare.py)",
           "template": {k: list(v) if isinstance(v, tuple) else v for k, v in fast["template"].items()},
           "train": dict(fast["train"]),
           "model": {k: list(fast["model"][k]) if isinstance(fast["model"][k], tuple) else fast["model"][k]
                     for k in model_keys}}
    if folds:
        doc["train"]["folds"] = folds
    if base["model"]["adaptation"] in ("full", "scratch"):
        doc["model"]["head_norm"] = fast["model"]["head_norm"]
    path = dest / f"{baseline}-fast.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def run_one(name: str, pipeline: str, bids: Path, out_root: Path, work: Path, extra: list[str]) -> dict:
    out = work / f"out-{name}"
    if out.exists():
        shutil.rmtree(out)
    # share the participant outputs (read only for the group level): symlink the subject folders
    out.mkdir(parents=True)
    for p in out_root.iterdir():
        if p.name.startswith("sub-") and p.is_dir():
            (out / p.name).symlink_to(p.resolve())
    cmd = [sys.executable, "-m", "bids_adhd", str(bids), str(out), "group", "--pipeline", pipeline, "-q", *extra]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = {"baseline": name, "pipeline": pipeline, "exit": proc.returncode, "wall_s": round(wall, 1),
           "cpu_s": round(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, 1),
           # ru_maxrss of children is the max over all children so far: runs go from small to large models
           "peak_rss_mb": round(r1.ru_maxrss / 1024, 1), "loadavg_before": round(load0[0], 2),
           "loadavg_after": round(os.getloadavg()[0], 2)}
    if proc.returncode != 0:
        row["error"] = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"
        print(f"{name}: FAILED: {row['error']}", flush=True)
        return row
    m = json.loads((out / "group" / "metrics.json").read_text())
    row.update(trainable=m["model"]["trainable"], total=m["model"]["total"], pretrained=m["pretrained"],
               pooled=m["pooled"], summary={k: v for k, v in m["summary"].items()},
               peak_gpu_mb=m["timing"].get("peak_memory_mb"), device=m["timing"]["device"])
    print(f"{name}: AUC {m['pooled']['auc']:.3f}, bal. acc {m['pooled']['balanced_accuracy']:.3f}, "
          f"{m['model']['trainable']:,} trainable, {wall:.0f} s", flush=True)
    return row


def markdown(res: dict) -> str:
    def f(v, nd=3):
        return "n/a" if v is None else f"{v:.{nd}f}"
    lines = [f"# Group-level baselines ({res['grid']} grid, {res['n_subjects']} subjects, "
             f"{res['folds'] or 'preset'} folds)", "",
             f"Data: {res['data']}. Encoder pre-trained: {res.get('pretrained')}. "
             f"Machine: {res['machine']}. Command: `{res['command']}`", "",
             "| baseline | pooled AUC | bal. acc. | AUC mean ± SD (folds) | trainable | total | wall s | CPU s "
             "| peak RSS MB | peak GPU MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r.get("exit"):
            lines.append(f"| {r['baseline']} | failed: {r.get('error', '')} | | | | | {r['wall_s']} | | | |")
            continue
        s = r["summary"]["auc"]
        lines.append(f"| {r['baseline']} | {f(r['pooled']['auc'])} | {f(r['pooled']['balanced_accuracy'])} | "
                     f"{f(s['mean'])} ± {f(s['sd'])} | {r['trainable']:,} | {r['total']:,} | {r['wall_s']} | "
                     f"{r['cpu_s']} | {r['peak_rss_mb']} | {r.get('peak_gpu_mb') or 'n/a'} |")
    lines += ["", "Peak RSS is the largest resident set of any group-level subprocess so far (getrusage of "
              "children), so it is exact for the first row and an upper bound after that.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bids", help="BIDS_DIR (with participants.tsv)")
    ap.add_argument("--out", help="OUTPUT_DIR of a finished participant level")
    ap.add_argument("--synthetic", type=int, default=0, metavar="N", help="write synthetic maps for N subjects")
    ap.add_argument("--effect", type=float, default=0.08)
    ap.add_argument("--grid", choices=["fast", "paper"], default="fast")
    ap.add_argument("--baselines", nargs="+", default=list(BASELINES))
    ap.add_argument("--folds", type=int, default=None)
    ap.add_argument("--work", default="/tmp/bids_adhd_compare")
    ap.add_argument("--extra", default="", help="extra group-level arguments, e.g. '--device cuda --nprocs 2'")
    args = ap.parse_args(argv)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.synthetic:
        from bids_adhd.config import load_pipeline
        from bids_adhd.simulate_maps import write_synthetic_maps

        bids, out_root = work / "bids", work / "maps"
        if not (out_root / "sub-01").exists():
            write_synthetic_maps(out_root, bids, n_subjects=args.synthetic, seed=0, effect=args.effect,
                                 template_cfg=load_pipeline(args.grid).template)
        data = f"synthetic template-space maps (simulate_maps.write_synthetic_maps, effect {args.effect})"
    else:
        if not (args.bids and args.out):
            ap.error("give --bids and --out, or --synthetic N")
        bids, out_root = Path(args.bids), Path(args.out)
        data = f"participant-level outputs in {out_root}"
    n = len([p for p in out_root.glob("sub-*") if p.is_dir()])
    extra = args.extra.split()
    if args.folds and args.grid == "paper":
        extra += ["--folds", str(args.folds)]
    rows = []
    for name in args.baselines:
        pipeline = str(fast_variant(name, work, args.folds)) if args.grid == "fast" else name
        rows.append(run_one(name, pipeline, bids, out_root, work, extra))
    import platform
    res = {"grid": args.grid, "n_subjects": n, "folds": args.folds, "data": data, "rows": rows,
           "pretrained": next((r.get("pretrained") for r in rows if "pretrained" in r), None),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "command": " ".join(sys.argv)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "group_compare.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "group_compare.md").write_text(markdown(res))
    print(f"wrote {RESULTS / 'group_compare.json'} and group_compare.md")
    return 0 if all(r.get("exit") == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

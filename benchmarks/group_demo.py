"""The README demo, measured: simulate -> participant (fast) -> group (fast), with and without the effect.

For each ``--effect`` (default 0.08 and 0): ``bids_adhd simulate`` (20 subjects,
seed 1, demo size: what ``make demo`` runs), the participant level with
``--pipeline fast``, the group level with ``--pipeline fast``, each through the
command line in a subprocess. The simulator's anatomy depends only on the seed
and the subject index, so the effect-0 dataset is the same subjects without the
planted FA reduction: its AUC measures leakage/chance.

Recorded per effect: wall and CPU time (user + sys of the subprocess) of each
step, the load average before/after (the machine may be shared), and the
group level's pooled out-of-fold metrics, mean ± SD over folds and whether the
encoder was pre-trained. ``--synthetic-maps`` skips simulate + participant and
writes template-space maps directly (``simulate_maps.write_synthetic_maps``): a
quick check of the group level alone.

Writes ``benchmarks/results/group_demo.json`` (and prints a summary).

Run from the repository root:
    .venv/bin/python benchmarks/group_demo.py                 # ~15-30 min on 2 idle cores
    .venv/bin/python benchmarks/group_demo.py --effects 0.08 --reuse   # group level again on the same data
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "group_demo.json"


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def step(name: str, cmd: list[str], log: Path) -> dict:
    load0 = os.getloadavg()
    c0, t0 = _cpu_children(), time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    out = {"step": name, "command": " ".join(cmd), "exit": proc.returncode,
           "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(_cpu_children() - c0, 1),
           "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
           "peak_rss_mb_children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}
    print(f"  {name}: exit {proc.returncode}, {out['wall_s']} s wall, {out['cpu_s']} s CPU "
          f"(load {load0[0]:.1f} -> {out['loadavg_after'][0]:.1f})", flush=True)
    if proc.returncode != 0:
        print(log.read_text()[-3000:], file=sys.stderr)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1, help="simulator seed (make demo uses 1)")
    ap.add_argument("--effects", type=float, nargs="+", default=[0.08, 0.0])
    ap.add_argument("--pipeline", default="fast")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--work", default="/tmp/bids_adhd_group_demo")
    ap.add_argument("--reuse", action="store_true", help="keep existing simulated data and participant outputs")
    ap.add_argument("--synthetic-maps", action="store_true",
                    help="write template-space maps directly instead of simulate + participant")
    ap.add_argument("--group-args", default="", help="extra arguments for the group level (quoted)")
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args(argv)

    py = [sys.executable, "-m", "bids_adhd"]
    work = Path(args.work)
    results = {"subjects": args.subjects, "seed": args.seed, "pipeline": args.pipeline, "nprocs": args.nprocs,
               "synthetic_maps": args.synthetic_maps, "machine": {"platform": platform.platform(),
                                                                  "cpus": os.cpu_count()},
               "runs": []}
    for effect in args.effects:
        print(f"effect {effect}:", flush=True)
        d = work / f"effect-{effect:g}"
        bids, out = d / "bids", d / "out"
        if not args.reuse and d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        steps = []
        if args.synthetic_maps:
            if not (out / "sub-01").exists():
                from bids_adhd.config import load_pipeline
                from bids_adhd.simulate_maps import write_synthetic_maps
                t0 = time.perf_counter()
                write_synthetic_maps(out, bids, n_subjects=args.subjects, seed=args.seed, effect=effect,
                                     template_cfg=load_pipeline(args.pipeline).template)
                steps.append({"step": "synthetic maps", "wall_s": round(time.perf_counter() - t0, 1)})
        else:
            if not (bids / "participants.tsv").exists():
                steps.append(step("simulate", py + ["simulate", str(bids), "--subjects", str(args.subjects),
                                                    "--seed", str(args.seed), "--size", "demo",
                                                    "--effect", str(effect)], d / "simulate.log"))
            steps.append(step("participant", py + [str(bids), str(out), "participant", "--pipeline", args.pipeline,
                                                   "--nprocs", str(args.nprocs), "--work-dir", str(d / "work"),
                                                   "-q"], d / "participant.log"))
        steps.append(step("group", py + [str(bids), str(out), "group", "--pipeline", args.pipeline,
                                         "--nprocs", str(args.nprocs), *args.group_args.split()],
                          d / "group.log"))
        run = {"effect": effect, "steps": steps}
        mpath = out / "group" / "metrics.json"
        if steps[-1].get("exit") == 0 and mpath.is_file():
            m = json.loads(mpath.read_text())
            run.update(pooled=m["pooled"], summary=m["summary"], folds=m["folds"], pretrained=m["pretrained"],
                       warning=m.get("warning"), trainable=m["model"]["trainable"], timing=m["timing"])
            print(f"  pooled AUC {m['pooled']['auc']:.3f}, balanced accuracy {m['pooled']['balanced_accuracy']:.3f} "
                  f"(n={m['pooled']['n']}, pretrained={m['pretrained']})", flush=True)
        run["total_wall_s"] = round(sum(s.get("wall_s", 0) for s in steps), 1)
        results["runs"].append(run)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)       # after every effect
        tmp = Path(args.out).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}", flush=True)
    return 0 if all(r["steps"][-1].get("exit") == 0 for r in results["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The paper presets trained for real on CPU: paper-fmcib and paper-ctfm end to end through the CLI.

For each preset: synthetic template-space maps for ``--subjects`` subjects
(``learn.data.write_synthetic_maps``, planted FA effect 0.08, seed 1) on the
preset's own grid (the paper grid, 96³ at 2 mm), then
``bids_adhd BIDS OUT group --pipeline <tmp.yaml> --folds F --device cpu`` in
a subprocess, where ``tmp.yaml`` is ``base: <preset>`` with only
``train.epochs`` / ``train.batch_size`` overridden (``--epochs``,
``--batch-size``): the encoder, LoRA, head, grid, input frame, optimiser and
augmentation are the preset's. The group level also trains its final model on
all subjects, as always.

Recorded per preset: wall and CPU time and peak resident memory of that
subprocess alone (``os.wait4``), the load average before/after (the machine may
be shared: the times are only meaningful with it), seconds per training epoch
(each fold's and the final model's history), trainable/total parameters, the
pooled out-of-fold metrics, whether the encoder was pre-trained (no weights
here: random init, reported), and whether LoRA was updated: the LoRA ``B``
factors start at exactly 0, so any non-zero ``B`` in the saved adapters is a
training update.

Writes/updates ``benchmarks/results/paper_cpu.json`` (one entry per preset, so
the two presets may run as two processes). ``--collect`` does not run
anything: it records what an unfinished run in ``--work`` has produced so far
(finished folds, their epoch times and adapters), marked ``finished: false``.

    nice -n 5 .venv/bin/python benchmarks/paper_cpu.py --presets paper-fmcib --epochs 1 --folds 2
    nice -n 5 .venv/bin/python benchmarks/paper_cpu.py --presets paper-ctfm --epochs 1 --folds 2
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "paper_cpu.json"


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; its own wall/CPU time and peak RSS (``os.wait4``), and the load around it."""
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    return {"command": " ".join(cmd), "exit": os.waitstatus_to_exitcode(status),
            "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()]}


def lora_updates(adapter: Path) -> dict:
    """How much of the saved LoRA B factors is non-zero (B starts at exactly 0)."""
    from safetensors.torch import load_file

    tensors = load_file(str(adapter))
    bs = {k: v for k, v in tensors.items() if k.endswith("lora_B")}
    nonzero = sum(int((v != 0).sum()) for v in bs.values())
    return {"adapter": adapter.name, "lora_B_tensors": len(bs),
            "lora_B_tensors_nonzero": sum(1 for v in bs.values() if bool((v != 0).any())),
            "lora_B_nonzero_fraction": round(nonzero / max(1, sum(v.numel() for v in bs.values())), 4),
            "lora_B_max_abs": float(max((v.abs().max() for v in bs.values()), default=0.0))}


def summarise(gdir: Path) -> dict:
    m = json.loads((gdir / "metrics.json").read_text())
    histories = [json.loads((p / "metrics.json").read_text())["history"] for p in sorted(gdir.glob("fold-*"))]
    final = json.loads((gdir / "final" / "final.json").read_text())
    epochs = [round(h["seconds"], 1) for hist in histories + [final["history"]] for h in hist
              if h.get("stage", "lora") != "head"]
    adapters = [lora_updates(p) for p in sorted(gdir.glob("*/adapter.safetensors"))]
    return {"pooled": m["pooled"], "summary": m["summary"], "pretrained": m["pretrained"],
            "warning": m.get("warning"), "model": m["model"], "timing": m["timing"],
            "epoch_seconds": epochs, "lora_updates": adapters,
            "lora_updated": bool(adapters) and all(a["lora_B_tensors_nonzero"] > 0 for a in adapters)}


def running_group(work: Path) -> dict | None:
    """The still-running group process on ``work`` (Linux /proc): pid, CPU seconds, peak RSS so far (VmHWM)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            if b"group" in cmd and str(work / "bids").encode() in cmd:
                status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
                ticks = (proc / "stat").read_text().rsplit(")", 1)[1].split()[11:13]
                return {"pid": int(proc.name), "cpu_s_so_far": round(sum(map(int, ticks)) / os.sysconf("SC_CLK_TCK"), 1),
                        "peak_rss_mb_so_far": round(int(status["VmHWM"].split()[0]) / 1024, 1)}
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return None


def collect(preset: str, args) -> dict:
    """What a (possibly unfinished) run of ``preset`` in ``--work`` has written so far."""
    d = Path(args.work) / preset
    gdir = d / "out" / "group"
    if (gdir / "metrics.json").is_file():
        return {"preset": preset, "finished": True, **summarise(gdir)}
    folds = []
    for f in sorted(gdir.glob("fold-*/metrics.json")):
        m = json.loads(f.read_text())
        folds.append({"fold": f.parent.name, "seconds": round(m["seconds"], 1), "metrics": m.get("metrics"),
                      "epoch_seconds": [round(h["seconds"], 1) for h in m["history"] if h.get("stage") != "head"],
                      "lora_updates": lora_updates(f.parent / "adapter.safetensors")})
    log = (d / "group.log").read_text() if (d / "group.log").is_file() else ""
    yml = d / f"{preset}-cpu.yaml"
    return {"preset": preset, "finished": False, "collected_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pipeline_yaml": yml.read_text() if yml.is_file() else None,
            "loadavg_at_collection": [round(x, 2) for x in os.getloadavg()], "folds_finished": folds,
            "still_running": running_group(d),
            "log_tail": log[-1500:]}


def save(entry_key: str, entry: dict, out: Path) -> None:
    """Merge one preset's entry into ``out`` under a lock (two presets may run as two processes)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    import tempfile
    with open(Path(tempfile.gettempdir()) / "bids_adhd_paper_cpu.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(out.read_text()) if out.is_file() else {}
        data.setdefault("presets", {})[entry_key] = entry
        data["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "note": "shared machine: compare times only with their load averages"}
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, out)


def run_preset(preset: str, args) -> dict:
    import yaml

    from bids_adhd.config import load_pipeline
    from bids_adhd.learn.data import write_synthetic_maps

    d = Path(args.work) / preset
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    cfg = load_pipeline(preset)
    if args.smoke_grid:
        import dataclasses
        cfg = dataclasses.replace(cfg, template=dataclasses.replace(cfg.template, resolution_mm=6.0,
                                                                    shape=(32, 32, 32)))
    t0 = time.perf_counter()
    write_synthetic_maps(d / "out", d / "bids", n_subjects=args.subjects, seed=args.seed, effect=args.effect,
                         template_cfg=cfg.template)
    maps_s = round(time.perf_counter() - t0, 1)
    yml = d / f"{preset}-cpu.yaml"
    over = {"description": f"{preset} with fewer epochs for a CPU benchmark", "base": preset,
            "train": {"epochs": args.epochs, "batch_size": args.batch_size}}
    if args.smoke_grid:                      # checks the script itself; never the recorded benchmark
        over["template"] = {"resolution_mm": 6.0, "shape": [32, 32, 32], "registration_mm": 4.0}
    yml.write_text(yaml.safe_dump(over))
    cmd = [sys.executable, "-m", "bids_adhd", str(d / "bids"), str(d / "out"), "group", "--pipeline", str(yml),
           "--folds", str(args.folds), "--device", "cpu", "--nprocs", str(args.nprocs), "--skip-bids-validation"]
    run = run_measured(cmd, d / "group.log")
    entry = {"preset": preset, "subjects": args.subjects, "seed": args.seed, "effect": args.effect,
             "grid": {"shape": list(cfg.template.shape), "resolution_mm": cfg.template.resolution_mm},
             "smoke_grid": bool(args.smoke_grid),
             "overrides": {"train.epochs": args.epochs, "train.batch_size": args.batch_size, "folds": args.folds},
             "synthetic_maps_s": maps_s, "run": run}
    if run["exit"] == 0:
        entry.update(summarise(d / "out" / "group"))
    else:
        entry["log_tail"] = (d / "group.log").read_text()[-2000:]
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["paper-fmcib", "paper-ctfm"])
    ap.add_argument("--subjects", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--effect", type=float, default=0.08)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--work", default="/tmp/bids_adhd_paper_cpu")
    ap.add_argument("--out", default=str(RESULT))
    ap.add_argument("--smoke-grid", action="store_true", help="32^3 at 6 mm: a quick check of this script only")
    ap.add_argument("--collect", action="store_true", help="record what runs in --work wrote so far; run nothing")
    args = ap.parse_args(argv)
    if args.collect:
        for preset in args.presets:
            out = Path(args.out)
            old = json.loads(out.read_text()).get("presets", {}).get(preset, {}) if out.is_file() else {}
            save(preset, {**{k: v for k, v in old.items() if k in ("run", "overrides", "grid", "subjects")},
                          **collect(preset, args)}, out)
        return 0
    rc = 0
    for preset in args.presets:
        print(f"{preset}: {args.subjects} subjects, {args.folds} folds, {args.epochs} epoch(s)", flush=True)
        entry = run_preset(preset, args)
        save(preset, entry, Path(args.out))
        run = entry["run"]
        print(f"  exit {run['exit']}, {run['wall_s']} s wall, {run['cpu_s']} s CPU, peak RSS {run['peak_rss_mb']} MB, "
              f"load {run['loadavg_before'][0]} -> {run['loadavg_after'][0]}; epochs {entry.get('epoch_seconds')}; "
              f"LoRA updated: {entry.get('lora_updated')}", flush=True)
        rc = rc or run["exit"]
    return rc


if __name__ == "__main__":
    raise SystemExit(main())

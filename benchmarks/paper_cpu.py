"""The paper presets trained for real on CPU: paper-fmcib and paper-ctfm end to end through the CLI.

For each preset: synthetic template-space maps for ``--subjects`` subjects
(``simulate_maps.write_synthetic_maps``, planted FA effect 0.08, seed 1) on the
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

``--models fmcib`` (or ``ct-fm``) picks the preset by model (``paper-fmcib``,
``paper-ctfm``). ``--resume`` continues a killed run in ``--work`` (same maps,
same pipeline file; the group level's own ``--resume`` skips finished folds
and replays an unfinished one from its last epoch checkpoint); the entry then
says ``resumed: true`` and its ``run`` times and peak RSS are those of the
resumed process only (epoch times come from the folds' histories, whole).
``--work`` should survive a reboot for that (the default is under /tmp).

    nice -n 5 .venv/bin/python benchmarks/paper_cpu.py --models fmcib --epochs 1 --folds 2 --work benchmarks/.work
    nice -n 5 .venv/bin/python benchmarks/paper_cpu.py --models fmcib --epochs 1 --folds 2 --work benchmarks/.work --resume
    nice -n 5 .venv/bin/python benchmarks/paper_cpu.py --models ct-fm --epochs 1 --folds 2 --work benchmarks/.work
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
#: --models NAME -> the paper preset of that foundation model
MODEL_PRESETS = {"fmcib": "paper-fmcib", "ct-fm": "paper-ctfm", "ctfm": "paper-ctfm"}


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; its own wall/CPU time and peak RSS (``os.wait4``), and the load around it."""
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    return {"command": " ".join(cmd), "log": str(log), "exit": os.waitstatus_to_exitcode(status),
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


def status_of(entry: dict) -> dict:
    """What of ``entry`` is a finished, quotable measurement: derived from the entry, no number changed."""
    import re

    if entry.get("finished"):
        run = entry.get("run", {})
        return {"finished": True, "quotable": "everything: pooled metrics, per-fold metrics, epoch times, "
                "the process's wall/CPU time and peak RSS", "load": [run.get("loadavg_before"), run.get("loadavg_after")],
                "pretrained": entry.get("pretrained")}
    log = entry.get("log_tail") or ""
    planned = re.findall(r"fold \d+/(\d+)", log)
    folds = entry.get("folds_finished", [])
    pretrained = True if "weights loaded from" in log else False if "RANDOMLY INITIALISED" in log else None
    return {
        "finished": False,
        "cv_folds_finished": f"{len(folds)} of {planned[-1] if planned else '?'}",
        "final_model": "started, not finished" if "final model" in log else "not started",
        "pooled_metrics": "none: group/metrics.json was never written",
        "quotable": "only the finished folds: their test metrics (10 subjects each), epoch wall times and LoRA B "
                    "updates; wall times mostly measure the machine's load",
        "not_quotable": "pooled metrics; wall/CPU time and peak RSS of a whole run (still_running holds the "
                        "process's CPU time and VmHWM up to collected_at: lower bounds, not totals)",
        "load": entry.get("loadavg_at_collection"),
        "pretrained": pretrained if pretrained is not None else "not in the log tail",
    }


def render_markdown(data: dict) -> str:
    """benchmarks/results/paper_cpu.md: the JSON in words, finished vs not per preset."""
    lines = ["# paper_cpu: the paper presets trained on CPU", "",
             "Generated by `benchmarks/paper_cpu.py` from `paper_cpu.json` (no number edited). "
             f"Machine: {data.get('machine', {}).get('cpus')} CPUs, shared; compare times only with their loads.", ""]
    for name, e in data.get("presets", {}).items():
        st = e.get("status") or status_of(e)
        lines += [f"## {name}: {'FINISHED' if st['finished'] else 'NOT FINISHED'}", ""]
        lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in st.items() if k != "finished"]
        if e.get("collected_at"):
            lines.append(f"- collected at {e['collected_at']} (`--collect`, while the run was going)")
        if e.get("still_running"):
            r = e["still_running"]
            lines.append(f"- process so far: {r['cpu_s_so_far']} CPU s, peak RSS {r['peak_rss_mb_so_far']} MB")
        for f in e.get("folds_finished", []):
            m, lu = f.get("metrics") or {}, f.get("lora_updates") or {}
            lines.append(f"- {f['fold']}: epoch wall s {f.get('epoch_seconds')}, test AUC {m.get('auc')}, accuracy "
                         f"{m.get('accuracy')} (n={m.get('n')}); LoRA B non-zero in {lu.get('lora_B_tensors_nonzero')} "
                         f"of {lu.get('lora_B_tensors')} layers")
        if st["finished"]:
            lines.append(f"- pooled: {e.get('pooled')}; run: {e.get('run')}")
        lines.append("")
    return "\n".join(lines)


def save(entry_key: str, entry: dict, out: Path) -> None:
    """Merge one preset's entry into ``out`` under a lock (two presets may run as two processes)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    import tempfile
    with open(Path(tempfile.gettempdir()) / "bids_adhd_paper_cpu.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(out.read_text()) if out.is_file() else {}
        data.setdefault("presets", {})[entry_key] = {**entry, "status": status_of(entry)}
        data["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "note": "shared machine: compare times only with their load averages"}
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, out)
        out.with_suffix(".md").write_text(render_markdown(data) + "\n")


def report(out: Path) -> None:
    """Add each entry's derived ``status`` to ``out`` and write ``out``.md; nothing measured is touched."""
    data = json.loads(out.read_text())
    for entry in data.get("presets", {}).values():
        if "finished" not in entry and "run" in entry:     # written before run_preset recorded it
            entry["finished"] = entry["run"].get("exit") == 0 and "pooled" in entry
        entry["status"] = status_of(entry)
    out.write_text(json.dumps(data, indent=2) + "\n")
    out.with_suffix(".md").write_text(render_markdown(data) + "\n")


def prepare_work(preset: str, cfg, args) -> tuple[Path, float | None, bool]:
    """The work dir with the synthetic maps and the pipeline file; reused as it is with ``--resume``.

    Returns ``(pipeline_yaml, seconds to write the maps or None when reused, resumed)``.
    """
    import yaml

    from bids_adhd.simulate_maps import write_synthetic_maps

    d = Path(args.work) / preset
    yml = d / f"{preset}-cpu.yaml"
    over = {"description": f"{preset} with fewer epochs for a CPU benchmark", "base": preset,
            "train": {"epochs": args.epochs, "batch_size": args.batch_size}}
    if args.smoke_grid:                      # checks the script itself; never the recorded benchmark
        over["template"] = {"resolution_mm": 6.0, "shape": [32, 32, 32], "registration_mm": 4.0}
    if args.resume and (d / "bids" / "participants.tsv").is_file() and yml.is_file():
        if yaml.safe_load(yml.read_text()) != over:
            raise SystemExit(f"--resume: {yml} differs from this command's overrides; run without --resume")
        return yml, None, True
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    write_synthetic_maps(d / "out", d / "bids", n_subjects=args.subjects, seed=args.seed, effect=args.effect,
                         template_cfg=cfg.template)
    maps_s = round(time.perf_counter() - t0, 1)
    yml.write_text(yaml.safe_dump(over))
    return yml, maps_s, False


def run_preset(preset: str, args) -> dict:
    from bids_adhd.config import load_pipeline

    d = Path(args.work) / preset
    cfg = load_pipeline(preset)
    if args.smoke_grid:
        import dataclasses
        cfg = dataclasses.replace(cfg, template=dataclasses.replace(cfg.template, resolution_mm=6.0,
                                                                    shape=(32, 32, 32)))
    yml, maps_s, resumed = prepare_work(preset, cfg, args)
    cmd = [sys.executable, "-m", "bids_adhd", str(d / "bids"), str(d / "out"), "group", "--pipeline", str(yml),
           "--folds", str(args.folds), "--device", "cpu", "--nprocs", str(args.nprocs), "--skip-bids-validation"]
    run = run_measured(cmd + (["--resume"] if resumed else []), d / ("group.resumed.log" if resumed else "group.log"))
    entry = {"preset": preset, "subjects": args.subjects, "seed": args.seed, "effect": args.effect,
             "grid": {"shape": list(cfg.template.shape), "resolution_mm": cfg.template.resolution_mm},
             "smoke_grid": bool(args.smoke_grid),
             "overrides": {"train.epochs": args.epochs, "train.batch_size": args.batch_size, "folds": args.folds},
             "synthetic_maps_s": maps_s, "resumed": resumed, "run": run}
    if run["exit"] == 0:
        entry.update(summarise(d / "out" / "group"))
        entry["finished"] = "pooled" in entry
    else:
        entry["log_tail"] = Path(run["log"]).read_text()[-2000:]
    return entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["paper-fmcib", "paper-ctfm"])
    ap.add_argument("--models", nargs="+", choices=sorted(MODEL_PRESETS), default=None,
                    help="run the paper preset of these models instead of --presets (fmcib: paper-fmcib)")
    ap.add_argument("--resume", action="store_true",
                    help="continue a killed run in --work (same maps and overrides) through the group level's --resume")
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
    ap.add_argument("--report", action="store_true",
                    help="only (re)derive each entry's status and write the .md beside --out; run nothing")
    args = ap.parse_args(argv)
    if args.models:
        args.presets = list(dict.fromkeys(MODEL_PRESETS[m] for m in args.models))
    if args.report:
        report(Path(args.out))
        return 0
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

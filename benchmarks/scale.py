"""HBN-scale datasets (issue #15): a participant job in a 2,000-subject dataset vs alone; the group
level's map collection and streamed loading at N = 200 and N = 2,000.

Participant level
    Builds a skeleton shaped like the Healthy Brain Network: ``--skeleton`` subjects, each with anat
    (T1w), dwi, 3 func runs and 2 fmaps (16 files: 32,000 for 2,000 subjects), every file a hard link
    to one tiny file (little disk), plus one real subject, ``sub-target`` (sub-01 of a
    ``bids_adhd simulate --size demo`` dataset). The same subject also gets a dataset of its own.
    Then, ``--repeats`` times, interleaved: ``bids_adhd DS OUT participant --participant-label target
    --pipeline P --nprocs 2`` (``--pipeline``, default fast) on both datasets, with ``--skip-bids-validation`` and with the
    validator; fresh output and work dirs each time. Reports wall time and peak RSS (the largest
    process of the tree) per run, the medians and the ratios big / alone.
    ``--reference`` also times, once, what a job cost before: pybids indexing the whole skeleton
    (``BIDSLayout(DS, validate=False)``, metadata included) and the validator on the whole tree.

Group level
    Writes synthetic template-space maps (``simulate_maps.write_synthetic_maps``, the paper grid
    96³ at 2 mm) for ``--unique`` subjects and hard-links them into OUTPUT_DIRs of N subjects. For
    each N, in a fresh process: ``collect_inputs`` (maps + labels), then the group level's streamed
    inputs (``group._load_images``: a bounded MONAI CacheDataset) and one pass over every run in
    training-size batches through ``data.batch_loader`` (the loader ``train_model`` uses, with
    ``train.num_workers`` = ``--workers``). No model runs: this measures the data path, whose
    memory used to grow with N (every input held in memory). Peak RSS from ``getrusage``.

Writes ``benchmarks/results/scale.json`` and ``scale.md``. The machine may be shared: the load
average is recorded before and after every run. From the repository root:
    nice -n 5 .venv/bin/python benchmarks/scale.py
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PY = sys.executable


def measured(cmd: list[str], log: Path, env=None) -> dict:
    """Run ``cmd`` through a wrapper process: wall time, exit code, the tree's peak RSS, the load."""
    wrapper = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
               "rc = subprocess.run(sys.argv[2:], stdout=open(sys.argv[1], 'w'), stderr=subprocess.STDOUT).returncode; "
               "print(json.dumps({'exit': rc, 'wall_s': time.perf_counter() - t, "
               "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))")
    load0 = os.getloadavg()
    proc = subprocess.run([PY, "-c", wrapper, str(log), *cmd], capture_output=True, text=True, cwd=ROOT, env=env)
    out = json.loads(proc.stdout)
    out.update(wall_s=round(out["wall_s"], 2), peak_rss_mb=round(out["peak_rss_mb"], 1),
               loadavg_before=[round(x, 2) for x in load0], loadavg_after=[round(x, 2) for x in os.getloadavg()])
    if out["exit"]:
        print(log.read_text()[-3000:], file=sys.stderr)
    return out


# --- participant level ------------------------------------------------------------------

def _tiny_files(folder: Path) -> dict[str, Path]:
    """One tiny file per kind; every skeleton file is a hard link to one of these."""
    import nibabel as nib

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    files = {}
    for kind, shape in (("T1w", (8, 8, 8)), ("dwi", (8, 8, 8, 7)), ("bold", (8, 8, 8, 5)),
                        ("magnitude1", (8, 8, 8)), ("phasediff", (8, 8, 8))):
        files[kind + ".nii.gz"] = folder / f"{kind}.nii.gz"
        nib.save(nib.Nifti1Image(rng.integers(0, 100, shape).astype(np.int16), aff), str(files[kind + ".nii.gz"]))
    sidecars = {"T1w": {}, "dwi": {"PhaseEncodingDirection": "j-", "TotalReadoutTime": 0.05},
                "bold": {"RepetitionTime": 0.8, "TaskName": "rest"}, "magnitude1": {},
                "phasediff": {"EchoTime1": 0.00492, "EchoTime2": 0.00738}}
    for kind, meta in sidecars.items():
        files[kind + ".json"] = folder / f"{kind}.json"
        files[kind + ".json"].write_text(json.dumps(meta))
    files["dwi.bval"] = folder / "dwi.bval"
    files["dwi.bval"].write_text("0 1000 1000 1000 1000 1000 1000\n")
    vecs = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [.7071, .7071, 0], [.7071, 0, .7071],
                     [0, .7071, .7071]]).T
    files["dwi.bvec"] = folder / "dwi.bvec"
    np.savetxt(files["dwi.bvec"], vecs, fmt="%.4f")
    return files


def _skeleton_subject(root: Path, sub: str, tiny: dict[str, Path]) -> int:
    layout = {"anat": [("T1w", "")], "dwi": [("dwi", "")],
              "func": [("bold", f"_task-rest_run-{r}") for r in (1, 2, 3)],
              "fmap": [("magnitude1", ""), ("phasediff", "")]}
    n = 0
    for datatype, entries in layout.items():
        folder = root / f"sub-{sub}" / datatype
        folder.mkdir(parents=True)
        for kind, ents in entries:
            for ext in (".nii.gz", ".json", ".bval", ".bvec"):
                if kind + ext in tiny:
                    os.link(tiny[kind + ext], folder / f"sub-{sub}{ents}_{kind}{ext}")
                    n += 1
    return n


def _add_target(root: Path, demo: Path) -> None:
    """sub-01 of the simulated dataset as sub-target (hard links, file names renamed)."""
    for src in (demo / "sub-01").rglob("*"):
        if src.is_file():
            dst = root / "sub-target" / src.relative_to(demo / "sub-01")
            dst = dst.with_name(dst.name.replace("sub-01", "sub-target"))
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.link(src, dst)


def _top_level(root: Path, subjects: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "HBN-shaped skeleton", "BIDSVersion": "1.10.0",
                                                               "Authors": ["bids_adhd benchmarks"]}))
    (root / "README").write_text("Skeleton dataset for benchmarks/scale.py: hard links to tiny images.\n")
    (root / "task-rest_bold.json").write_text(json.dumps({"TaskName": "rest"}))
    rows = "".join(f"sub-{s}\t{'ADHD' if i % 2 else 'TD'}\n" for i, s in enumerate(subjects))
    (root / "participants.tsv").write_text("participant_id\tdiagnosis\n" + rows)


def build_datasets(tmp: Path, n_skeleton: int) -> tuple[Path, Path, int]:
    subprocess.run([PY, "-m", "bids_adhd", "simulate", str(tmp / "demo"), "--subjects", "2", "--seed", "3",
                    "--size", "demo"], check=True, capture_output=True, cwd=ROOT)
    tiny = _tiny_files(tmp / "tiny")
    big, alone = tmp / "big", tmp / "alone"
    labels = [f"{i:04d}" for i in range(1, n_skeleton + 1)]
    _top_level(big, labels + ["target"])
    n_files = sum(_skeleton_subject(big, s, tiny) for s in labels)
    _add_target(big, tmp / "demo")
    _top_level(alone, ["target"])
    _add_target(alone, tmp / "demo")
    return big, alone, n_files


def participant_runs(tmp: Path, big: Path, alone: Path, repeats: int, pipeline: str, save=None) -> list[dict]:
    """Interleaved runs; ``save(runs)`` after each (a run cut short keeps what was measured)."""
    runs = []
    for rep in range(1, repeats + 1):
        for validate in (False, True):
            for name, ds in (("alone", alone), ("big", big)):
                tag = f"{name}-{'val' if validate else 'skip'}-{rep}"
                cmd = [PY, "-m", "bids_adhd", str(ds), str(tmp / f"out-{tag}"), "participant", "--participant-label",
                       "target", "--pipeline", pipeline, "--nprocs", "2", "--work-dir", str(tmp / f"work-{tag}")]
                if not validate:
                    cmd.append("--skip-bids-validation")
                res = measured(cmd, tmp / f"{tag}.log")
                print(f"  {tag}: exit {res['exit']}, {res['wall_s']} s, {res['peak_rss_mb']} MB "
                      f"(load {res['loadavg_before'][0]})", flush=True)
                runs.append({"dataset": name, "validation": validate, "repeat": rep, **res})
                if save is not None:
                    save(runs)
                shutil.rmtree(tmp / f"work-{tag}", ignore_errors=True)
                shutil.rmtree(tmp / f"out-{tag}", ignore_errors=True)
    return runs


def summarise_participant(runs: list[dict]) -> dict:
    out = {}
    for validate in (False, True):
        key = "with_validation" if validate else "skip_validation"
        ok = {name: [r for r in runs if r["dataset"] == name and r["validation"] == validate and r["exit"] == 0]
              for name in ("alone", "big")}
        if not all(ok.values()):
            continue
        med = {name: statistics.median(r["wall_s"] for r in ok[name]) for name in ok}
        rss = {name: statistics.median(r["peak_rss_mb"] for r in ok[name]) for name in ok}
        out[key] = {"median_wall_s": med, "ratio_big_over_alone": round(med["big"] / med["alone"], 3),
                    "median_peak_rss_mb": rss, "n_runs": {name: len(v) for name, v in ok.items()}}
    return out


def reference(tmp: Path, big: Path) -> dict:
    """Once: what every job paid before (whole-dataset pybids index; validator on the whole tree)."""
    code = ("import sys; from bids import BIDSLayout; "
            "BIDSLayout(sys.argv[1], validate=False, derivatives=False)")
    index = measured([PY, "-c", code, str(big)], tmp / "ref-index.log")
    exe = str(Path(PY).with_name("bids-validator-deno"))
    validator = measured([exe, "--json", str(big)], tmp / "ref-validator.log")
    print(f"  reference: whole index {index['wall_s']} s, whole validation {validator['wall_s']} s", flush=True)
    return {"pybids_index_whole_dataset": index, "validator_whole_dataset": validator}


# --- group level ----------------------------------------------------------------------------

def build_group(tmp: Path, unique: int, sizes: list[int]) -> dict[int, tuple[Path, Path]]:
    from bids_adhd import derivatives as dv
    from bids_adhd.config import TemplateConfig
    from bids_adhd.learn.data import run_maps
    from bids_adhd.simulate_maps import write_synthetic_maps

    rows = write_synthetic_maps(tmp / "maps-u", tmp / "bids-u", n_subjects=unique, seed=0,
                                template_cfg=TemplateConfig())
    out = {}
    for n in sizes:
        bids, deriv = tmp / f"bids-{n}", tmp / f"out-{n}"
        bids.mkdir()
        (bids / "dataset_description.json").write_text(json.dumps({"Name": "scale", "BIDSVersion": "1.10.0"}))
        lines = ["participant_id\tdiagnosis\tsite"]
        for i in range(n):
            src_row = rows[i % unique]
            sub = f"{i + 1:05d}"
            src = run_maps(tmp / "maps-u", dv.Source(subject=src_row["participant_id"][4:]))
            dst = run_maps(deriv, dv.Source(subject=sub))
            for a, b in zip(src.paths().values(), dst.paths().values()):
                b.parent.mkdir(parents=True, exist_ok=True)
                os.link(a, b)
            (bids / f"sub-{sub}").mkdir()
            lines.append(f"sub-{sub}\t{src_row['diagnosis']}\t{src_row['site']}")
        (bids / "participants.tsv").write_text("\n".join(lines) + "\n")
        out[n] = (bids, deriv)
    return out


def group_worker(bids: Path, deriv: Path, workers: int, batch_size: int, max_steps: int) -> dict:
    """In its own process: collect, stream every run once in batches; times and peak RSS."""
    from bids_adhd.config import load_pipeline
    from bids_adhd.dmri.template import template_grid
    from bids_adhd.learn.data import batch_loader
    from bids_adhd.learn.group import _load_images, collect_inputs

    cfg = load_pipeline("paper")
    cfg = cfg.replace("train", num_workers=workers, batch_size=batch_size)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    inputs = collect_inputs(bids, deriv, "diagnosis", "ADHD", cfg.train.folds, None, cfg.name)
    t_collect = time.perf_counter() - t0
    grid = template_grid(cfg.template)
    t0 = time.perf_counter()
    images, index = _load_images(inputs, cfg, grid)
    t_dataset = time.perf_counter() - t0
    items = [{"images": images, "index": i} for i in range(len(images))]
    order = np.random.default_rng(0).permutation(len(items)).tolist()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)][:max_steps or None]
    t0, seen, checksum = time.perf_counter(), 0, 0.0
    for batch in batch_loader(items, batches, workers):
        seen += len(batch)
        checksum += float(sum(float(x.mean()) for x in batch))
    t_stream = time.perf_counter() - t0
    return {"subjects": len(inputs.subjects), "runs": len(images), "cached_runs": images.cache_num,
            "collect_s": round(t_collect, 2), "dataset_s": round(t_dataset, 2), "streamed_runs": seen,
            "stream_s": round(t_stream, 2), "mean_input_value": checksum / max(seen, 1),
            "rss_after_imports_mb": round(rss0, 1),
            "peak_rss_mb_self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_mb_workers": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def group_runs(tmp: Path, sets: dict, args) -> list[dict]:
    runs = []
    for n, (bids, deriv) in sets.items():
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        proc = subprocess.run([PY, __file__, "--group-worker", str(bids), str(deriv), "--workers", str(args.workers),
                               "--batch-size", str(args.batch_size), "--max-steps", str(args.max_steps)],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(proc.returncode)
        res = {"n": n, "wall_s": round(time.perf_counter() - t0, 1), **json.loads(proc.stdout.splitlines()[-1]),
               "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
        print(f"  group N={n}: collect {res['collect_s']} s, stream {res['streamed_runs']} runs in {res['stream_s']} s, "
              f"peak RSS {res['peak_rss_mb_self']} MB (workers {res['peak_rss_mb_workers']} MB)", flush=True)
        runs.append(res)
    return runs


# --- report ----------------------------------------------------------------------------------

def write_markdown(res: dict, path: Path) -> None:
    p = res.get("participant", {})
    lines = ["# Scale benchmark (issue #15)", "", f"Command: `{res['command']}`  ", f"Machine: {res['machine']}; "
             "shared with other jobs: see the load averages per run in scale.json.", ""]
    if p:
        lines += [f"## Participant level: sub-target alone vs in a {p['skeleton_subjects']}-subject skeleton "
                  f"({p['skeleton_files']} skeleton files)", "",
                  "| validation | median wall alone (s) | median wall in the big dataset (s) | ratio | "
                  "median peak RSS alone / big (MB) |", "| --- | --- | --- | --- | --- |"]
        for key, s in p.get("summary", {}).items():
            lines.append(f"| {key.replace('_', ' ')} | {s['median_wall_s']['alone']:.1f} | "
                         f"{s['median_wall_s']['big']:.1f} | {s['ratio_big_over_alone']:.3f} | "
                         f"{s['median_peak_rss_mb']['alone']:.0f} / {s['median_peak_rss_mb']['big']:.0f} |")
        lines.append("")
        lines += ["| run | dataset | validation | exit | wall (s) | peak RSS (MB) | load before |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['repeat']} | {r['dataset']} | {r['validation']} | {r['exit']} | {r['wall_s']} | "
                  f"{r['peak_rss_mb']} | {r['loadavg_before'][0]} |" for r in p.get("runs", [])]
        if p.get("reference"):
            ref = p["reference"]
            lines += ["", "What every job paid before (once): pybids index of the whole skeleton "
                      f"{ref['pybids_index_whole_dataset']['wall_s']} s (peak RSS "
                      f"{ref['pybids_index_whole_dataset']['peak_rss_mb']} MB); validator on the whole tree "
                      f"{ref['validator_whole_dataset']['wall_s']} s (exit {ref['validator_whole_dataset']['exit']})."]
        lines.append("")
    g = res.get("group")
    if g:
        lines += ["## Group level: collect maps + labels, fill the cache, stream batches (no model)", "",
                  f"Paper grid 96³ × {g['channels']} channel(s), batch {g['batch_size']}, "
                  f"{g['workers']} loader worker(s), cache bound {g['cache_mb']} MiB; streamed: every run, at most --max-steps "
                  "batches (see group.command).", "",
                  "| N | runs | cached | collect (s) | stream (s) | streamed runs | peak RSS (MB) | workers' peak (MB) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['n']} | {r['runs']} | {r['cached_runs']} | {r['collect_s']} | {r['stream_s']} | "
                  f"{r['streamed_runs']} | {r['peak_rss_mb_self']} | {r['peak_rss_mb_workers']} |" for r in g["runs"]]
        lines += ["", f"Peak RSS ratio N = {g['runs'][-1]['n']} / N = {g['runs'][0]['n']}: "
                  f"{g['peak_rss_ratio']:.3f}", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skeleton", type=int, default=2000, help="skeleton subjects (default 2000)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pipeline", default="fast", help="participant-level preset or YAML (default fast); "
                    "ci/smoke-pipeline.yaml makes the fixed per-job cost a larger share: a stricter ratio")
    ap.add_argument("--reference", action="store_true", help="also time the whole-dataset index and validation once")
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 2000], help="group-level N values")
    ap.add_argument("--unique", type=int, default=16, help="distinct synthetic subjects the group sets link to")
    ap.add_argument("--workers", type=int, default=2, help="train.num_workers for the group-level loader")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=0, help="batches streamed per N (0: every run once)")
    ap.add_argument("--only", choices=["participant", "group"], default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    ap.add_argument("--group-worker", nargs=2, type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.group_worker:
        print(json.dumps(group_worker(*args.group_worker, args.workers, args.batch_size, args.max_steps)))
        return 0
    res = {"command": " ".join(["benchmarks/scale.py"] + sys.argv[1:]),
           "machine": f"{platform.platform()}, {os.cpu_count()} CPUs", "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.out.is_file():           # a partial run (--only) keeps the other part's results
        old = json.loads(args.out.read_text())
        res.update({k: old[k] for k in ("participant", "group") if k in old and args.only and k != args.only})
    with tempfile.TemporaryDirectory(prefix="bids_adhd_scale_") as tmp:
        tmp = Path(tmp)
        if args.only in (None, "participant"):
            t0 = time.perf_counter()
            big, alone, n_files = build_datasets(tmp, args.skeleton)
            print(f"built the skeleton ({n_files} files) in {time.perf_counter() - t0:.0f} s", flush=True)
            part = res["participant"] = {
                "skeleton_subjects": args.skeleton, "skeleton_files": n_files, "repeats_asked": args.repeats,
                "command_per_run": "bids_adhd DS OUT participant --participant-label target "
                                   f"--pipeline {args.pipeline} --nprocs 2 [--skip-bids-validation]"}

            def save(runs):
                part.update(runs=runs, summary=summarise_participant(runs))
                _write(res, args.out)

            participant_runs(tmp, big, alone, args.repeats, args.pipeline, save)
            part["reference"] = reference(tmp, big) if args.reference else None
        if args.only in (None, "group"):
            from bids_adhd.config import load_pipeline
            from bids_adhd.learn.data import cache_mb

            runs = group_runs(tmp, build_group(tmp, args.unique, args.sizes), args)
            res["group"] = {"runs": runs, "workers": args.workers, "batch_size": args.batch_size,
                            "channels": len(load_pipeline("paper").model.channels), "cache_mb": cache_mb(),
                            "peak_rss_ratio": round(runs[-1]["peak_rss_mb_self"] / runs[0]["peak_rss_mb_self"], 3)}
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _write(res, args.out)
    return 0


def _write(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, out.with_suffix(".md"))


if __name__ == "__main__":
    raise SystemExit(main())

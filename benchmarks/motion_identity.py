"""Still subjects (no motion, no eddy currents, no dropouts) through the motion step, per preset.

Issue 11 asks every transform within 0.05 mm / 0.05 deg of the identity and no volume resampled.
Simulates ``--subjects`` demo-size subjects without motion, eddy currents or dropouts, runs each
through the workflow's numerics before motion (premask, denoising, [Gibbs]: benchmarks/motion.py's
``preprocess``) and ``correct_motion`` with the preset's settings and the eddy stage along the
simulator's phase-encoding axis (as benchmarks/motion.py), and records per subject and preset: the
largest |translation| (mm) per axis and |rotation| (deg) of the head motion, the largest RMS
displacement over the truth brain of the composed (motion + eddy) transform, the resampled volumes,
the dropout slices flagged, the largest framewise displacement and the wall time of the step.
Writes ``benchmarks/results/motion_identity.json``. From the repository root:
    .venv/bin/python benchmarks/motion_identity.py --subjects 4 --seed 61 --pipeline default fast
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import motion as bench_motion  # noqa: E402  benchmarks/motion.py, a sibling script


def run_one(bids: Path, sub: str, name: str, nprocs: int) -> dict:
    from bids_adhd.config import load_pipeline
    from bids_adhd.dmri.motion import correct_motion

    cfg = load_pipeline(name).preproc
    data, affine, bvals, bvecs, undenoised = bench_motion.preprocess(bids, sub, cfg, nprocs)
    t = time.perf_counter()
    res = correct_motion(data, affine, bvals, bvecs, undenoised=undenoised,
                         **bench_motion.motion_kwargs(cfg, nprocs, 1))
    wall = time.perf_counter() - t
    eye = np.repeat(np.eye(4)[None], bvals.size, 0)
    disp = bench_motion.rms_errors(res["affines"], eye, bench_motion.truth_of(bids, sub)["brain"], affine)
    p = res["params"]
    return {"subject": sub, "pipeline": name, "trans_mm_max_xyz": np.abs(p[:, :3]).max(0).round(4).tolist(),
            "rot_deg_max_xyz": np.degrees(np.abs(p[:, 3:])).max(0).round(4).tolist(),
            "trans_mm_max": float(np.abs(p[:, :3]).max()), "rot_deg_max": float(np.degrees(np.abs(p[:, 3:])).max()),
            "composed_rms_disp_mm_max": float(disp.max()), "resampled": int(res["resampled"].sum()),
            "volumes": int(bvals.size), "dropout_slices": int(res["dropouts"].sum()),
            "fd_max_mm": float(res["fd"].max()), "motion_wall_s": round(wall, 1)}


def main(argv=None) -> int:
    from bids_adhd.simulate import simulate_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--seed", type=int, default=61)
    ap.add_argument("--pipeline", nargs="+", default=["default", "fast"])
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="keep the simulated data here (re-used if present)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "motion_identity.json")
    args = ap.parse_args(argv)
    bids = (args.work or Path(tempfile.mkdtemp(prefix="bench_still_"))) / "bids"
    if not bids.is_dir():
        simulate_dataset(bids, n_subjects=args.subjects, seed=args.seed, size="demo", motion=False, eddy=False,
                         dropouts=False, n_jobs=args.nprocs)
    recs = []
    for i in range(1, args.subjects + 1):
        for name in args.pipeline:
            recs.append(run_one(bids, f"{i:02d}", name, args.nprocs))
            print(json.dumps(recs[-1]), flush=True)
    summary = {name: {"subjects": len(rs), "trans_mm_max": max(r["trans_mm_max"] for r in rs),
                      "rot_deg_max": max(r["rot_deg_max"] for r in rs),
                      "composed_rms_disp_mm_max": max(r["composed_rms_disp_mm_max"] for r in rs),
                      "resampled_volumes": sum(r["resampled"] for r in rs),
                      "dropout_slices": sum(r["dropout_slices"] for r in rs),
                      "within_0.05mm_0.05deg": all(r["trans_mm_max"] <= 0.05 and r["rot_deg_max"] <= 0.05
                                                   for r in rs)}
               for name in args.pipeline for rs in [[r for r in recs if r["pipeline"] == name]]}
    out = {"command": " ".join(["benchmarks/motion_identity.py"] + (argv or sys.argv[1:])),
           "data": f"{args.subjects} subjects, bids_adhd simulate --size demo --seed {args.seed}, no motion, no eddy "
                   "currents, no dropouts", "nprocs": args.nprocs, "load_avg_at_end": os.getloadavg(),
           "code": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
           "summary": summary, "subjects": recs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

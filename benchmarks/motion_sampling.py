"""Motion correction: sparse vs dense mutual-information sampling, against the simulator's truth.

Simulates ``--subjects`` demo-size subjects (``bids_adhd simulate``; each has a few
volumes with planted head motion and ``derivatives/truth/.../desc-motion_timeseries.tsv``),
runs ``bids_adhd.dmri.motion.correct_motion`` on the raw series with each ``--sampling``
value (``none`` = dense) and the ``fast``/``paper`` optimiser schedules, and records the
wall/CPU time and the error of the recovered motion parameters against the truth
(max and median over volumes; translations in mm, rotations in degrees; the moved
volumes separately).

Writes ``benchmarks/results/motion_sampling.json``. Run from the repository root:
    .venv/bin/python benchmarks/motion_sampling.py --subjects 2 --sampling 0.25 none
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
RESULT = ROOT / "benchmarks" / "results" / "motion_sampling.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sampling", nargs="+", default=["0.25", "none"])
    ap.add_argument("--level-iters", type=int, nargs="+", default=[50, 10], help="fast preset: 50 10")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)

    import nibabel as nib
    from bids_adhd.dmri.motion import correct_motion

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bids = Path(tmp) / "bids"
        subprocess.run([sys.executable, "-m", "bids_adhd", "simulate", str(bids), "--subjects", str(max(2, args.subjects)),
                        "--seed", str(args.seed)], check=True, capture_output=True)
        for sub in sorted(p.name for p in bids.glob("sub-*"))[:args.subjects]:
            stem = bids / sub / "dwi" / f"{sub}_dwi"
            img = nib.load(f"{stem}.nii.gz")
            data = img.get_fdata(dtype=np.float32)
            bvals, bvecs = np.loadtxt(f"{stem}.bval"), np.loadtxt(f"{stem}.bvec")
            truth = np.loadtxt(bids / "derivatives" / "truth" / sub / "dwi" / f"{sub}_desc-motion_timeseries.tsv",
                               skiprows=1)
            moved = np.abs(truth).sum(1) > 0
            for s in args.sampling:
                sampling = None if s.lower() == "none" else float(s)
                t0, c0 = time.perf_counter(), os.times()
                res = correct_motion(data, img.affine, bvals, bvecs, level_iters=tuple(args.level_iters),
                                     nprocs=args.nprocs, sampling=sampling)
                c1 = os.times()
                err = res["params"] - truth
                et, er = np.abs(err[:, :3]), np.degrees(np.abs(err[:, 3:]))
                rows.append(dict(
                    subject=sub, sampling=sampling, shape=list(data.shape), wall_s=round(time.perf_counter() - t0, 2),
                    cpu_s=round(sum(c1[i] - c0[i] for i in (0, 1, 2, 3)), 2),
                    trans_err_max_mm=round(float(et.max()), 3), trans_err_median_mm=round(float(np.median(et)), 3),
                    rot_err_max_deg=round(float(er.max()), 3), rot_err_median_deg=round(float(np.median(er)), 3),
                    moved_volumes=int(moved.sum()),
                    moved_trans_err_max_mm=round(float(et[moved].max()), 3) if moved.any() else None,
                    moved_rot_err_max_deg=round(float(er[moved].max()), 3) if moved.any() else None))
                print(json.dumps(rows[-1]), flush=True)
    out = dict(command=" ".join(sys.argv), level_iters=args.level_iters, nprocs=args.nprocs,
               cpu_count=os.cpu_count(), loadavg_end=list(os.getloadavg()), runs=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A simulated demo subject with no motion, no eddy currents and no dropouts through the motion step.

Issue 11 asks every transform within 0.05 mm / 0.05 deg of the identity and no volume resampled.
Prints the largest |translation| (mm) and |rotation| (deg) per volume, the resampled count and the
dropout count. From the repository root:
    nice -n 5 .venv/bin/python benchmarks/motion_identity.py --directions 12
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def main(argv=None) -> int:
    from bids_adhd.dmri.motion import correct_motion
    from bids_adhd.simulate import simulate_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--directions", type=int, default=12)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--level-iters", type=int, nargs="+", default=[50, 10])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-eddy-stage", action="store_true")
    args = ap.parse_args(argv)
    out = Path(tempfile.mkdtemp()) / "bids"
    simulate_dataset(out, n_subjects=2, seed=args.seed, directions=args.directions, motion=False, eddy=False,
                     dropouts=False)
    d = out / "sub-01" / "dwi" / "sub-01_dwi"
    img = nib.load(f"{d}.nii.gz")
    t = time.perf_counter()
    res = correct_motion(img.get_fdata(dtype=np.float32), img.affine, np.loadtxt(f"{d}.bval"),
                         np.loadtxt(f"{d}.bvec").T, nprocs=2, rounds=args.rounds,
                         level_iters=tuple(args.level_iters), eddy_axis=None if args.no_eddy_stage else 1)
    p = res["params"]
    print(json.dumps({"trans_mm_max": np.abs(p[:, :3]).max(1).round(3).tolist(),
                      "rot_deg_max": np.degrees(np.abs(p[:, 3:])).max(1).round(3).tolist(),
                      "resampled": int(res["resampled"].sum()), "dropouts": int(res["dropouts"].sum()),
                      "wall_s": round(time.perf_counter() - t, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

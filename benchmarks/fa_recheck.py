"""Re-check the FA agreement with MRtrix3 (``dwi2tensor -ols -iter 0``) on the files a
``benchmarks/participant.py`` run left in ``--work``/run, with the current ``fit_dti``: the
agreement part of that benchmark without its hour of preprocessing (the input is identical:
the run's unrung b <= bmax series, its b-table and final mask, MRtrix3's FA map from it).

    .venv/bin/python benchmarks/fa_recheck.py --work /work/scratch/benchhbn --out benchmarks/results/participant_fa_recheck.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bids_adhd.dmri.dti import fit_dti  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="the --work directory of a benchmarks/participant.py run")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    run = Path(args.work) / "run"
    data = np.asarray(nib.load(str(run / "unrung_low.nii")).dataobj, np.float32)
    bvals, bvecs = np.loadtxt(run / "low.bval", ndmin=1), np.loadtxt(run / "low.bvec", ndmin=2).T
    mask = np.asarray(nib.load(str(run / "mask.nii.gz")).dataobj) > 0
    ours = fit_dti(data, bvals, bvecs, mask=mask, method="OLS", bmax=float(bvals.max()), nprocs=2)
    mr = np.nan_to_num(np.asarray(nib.load(str(run / "ols_fa.nii")).dataobj, np.float64))
    pd = mask & (ours["evals"][..., 2] > 1e-8)          # as the benchmark: where DIPY's tensor is positive definite
    diff = np.abs(ours["fa"].astype(np.float64) - mr)[pd]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    res = {"command": " ".join(["benchmarks/fa_recheck.py"] + (argv or sys.argv[1:])), "commit": commit,
           "shape": list(data.shape), "n_voxels": int(pd.sum()), "max_abs_diff": float(diff.max()),
           "median_abs_diff": float(np.median(diff)), "n_abs_diff_gt_5e-7": int((diff > 5e-7).sum()),
           "n_abs_diff_gt_1e-6": int((diff > 1e-6).sum())}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""Choose the realistic profile's default ``effect_d`` so that the oracle's AUC is about 0.75.

On a TUNING seed (7 by default; never used for any reported number), per subject: the noise-free
native truth FA with every regional factor at 1 except the natural variation (``effect_d`` = 0), and
the native region labels; then the oracle (docs/simulation.md) for any ``effect_d`` follows in closed
form (a carrier's region is multiplied by ``1 - d * REGION_FA_SD``; the FA clip at 0.95 is never
reached in these regions). Writes benchmarks/results/realistic_effect_tuning.json.

    python benchmarks/tune_realistic_effect.py --subjects 200 --seed 7
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from bids_adhd import simulate as sim
from bids_adhd import simulate_realistic as R


def subject_parts(s, seed, labels, laff, q):
    """(per-region FA sums without the carriers' shift, per-region voxel counts, rest-WM mean FA, carried)."""
    drawn = R.set_anatomy(s, seed, R.Options(effect_d=0.0, carrier_fraction=q), labels, laff)
    run, _ = R.motion_run(s, seed, R.Options(), 33)
    t = R.truth_maps(s, run)
    protocol, affine, P_inv = R.native_grid(s, run)
    pts = s.warp(sim._index_points(protocol.shape, P_inv @ affine))
    _, inside = s.fa_effect(pts)
    lab = np.zeros(len(pts), np.intp)
    v = np.rint(sim._apply(s.fa_effect.inv, pts[inside])).astype(np.intp)
    lab[inside] = labels[v[:, 0], v[:, 1], v[:, 2]]
    lab = lab.reshape(tuple(protocol.shape), order="F") * (t["effect"] > 0)
    fa = t["fa"].astype(np.float64)
    sums = np.array([fa[lab == k + 1].sum() for k in range(len(R.REGIONS))])
    counts = np.array([(lab == k + 1).sum() for k in range(len(R.REGIONS))])
    rest = fa[(t["wm"] > 0.5) & (t["effect"] == 0)].mean()
    carried = np.array([r in drawn["carried_regions"] for r in R.REGIONS])
    return sums, counts, rest, carried


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--carrier-fraction", type=float, default=R.DEFAULT_CARRIER_FRACTION)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "realistic_effect_tuning.json"))
    a = ap.parse_args()
    t0 = time.process_time()
    subjects = R.participants(a.subjects, a.seed)
    labels, laff = R.region_labels()
    parts = []
    for s in subjects:
        parts.append(subject_parts(s, a.seed, labels, laff, a.carrier_fraction))
    y = np.array([s.diagnosis == "ADHD" for s in subjects], int)
    rows = []
    for d in np.round(np.arange(0.0, 3.01, 0.25), 2):
        score = [(sums * np.where(c, 1 - d * R.REGION_FA_SD, 1.0)).sum() / counts.sum() / rest
                 for sums, counts, rest, c in parts]
        auc = roc_auc_score(y, score)
        rows.append({"effect_d": float(d), "oracle_auc": float(max(auc, 1 - auc))})
        print(rows[-1], flush=True)
    out = {"seed": a.seed, "subjects": a.subjects, "carrier_fraction": a.carrier_fraction,
           "note": "tuning seed: never used for a reported number", "rows": rows,
           "cpu_s": time.process_time() - t0}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Which encoder read-out a linear head can use: frozen features, repeated cross-validation.

For participant-level outputs of a simulated dataset (``--root`` holds ``bids/`` and ``out/``,
e.g. what ``benchmarks/group_demo.py`` leaves under /tmp/bids_adhd_group_demo/effect-E), builds
the ``fast`` preset's encoder (randomly initialised without CT-FM weights) with ``--init-seeds``,
computes every level's feature maps once for the template-space FA (``intensity`` of the preset)
and scores read-outs with a standardised L2 logistic regression (scikit-learn, C=1): the pooled
out-of-fold ROC-AUC of stratified 5-fold CV, averaged over 3 fold shuffles. Read-outs: the
global average of each level, all levels (``multiscale``), levels 0-3, and each level pooled to
2x2x2 cells (``spatial``). No LoRA, no training of the encoder: this compares what the frozen
features carry, cheaply, to choose the preset's ``feature_levels``.

Writes ``benchmarks/results/group_features.json``. Run from the repository root:
    .venv/bin/python benchmarks/group_features.py --root /tmp/bids_adhd_group_demo/effect-0.08 \
        --root /tmp/bids_adhd_group_demo/effect-0
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULT = ROOT / "benchmarks" / "results" / "group_features.json"


def _auc(F, y, shuffles=3):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    return [float(roc_auc_score(y, cross_val_predict(clf, F, y, method="predict_proba",
                                                     cv=StratifiedKFold(5, shuffle=True, random_state=r))[:, 1]))
            for r in range(shuffles)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, action="append", required=True)
    ap.add_argument("--pipeline", default="fast")
    ap.add_argument("--init-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)

    import torch
    from bids_adhd.config import load_pipeline
    from bids_adhd.dmri.template import template_grid
    from bids_adhd.learn.classifier import build_model
    from bids_adhd.learn.data import find_template_maps, load_input

    logging.disable(logging.WARNING)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cfg = load_pipeline(args.pipeline)
    grid = template_grid(cfg.template)
    runs = []
    for root in args.root:
        rows = list(csv.DictReader(open(root / "bids" / "participants.tsv"), delimiter="\t"))
        label = {r["participant_id"][4:]: int(r["diagnosis"] == "ADHD") for r in rows}
        complete, _ = find_template_maps(root / "out")
        subs = sorted(complete)
        y = np.array([label[s] for s in subs])
        x = torch.from_numpy(np.stack([load_input(complete[s][0], list(cfg.model.channels), grid,
                                                  cfg.model.intensity) for s in subs]))
        for seed in args.init_seeds:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            model, info = build_model(cfg.model.__class__(**{**cfg.model.__dict__, "feature_levels": ()}))
            model.eval()
            with torch.no_grad():
                chunks = [model.encoder(x[i:i + 4]) for i in range(0, len(x), 4)]
            maps = [torch.cat([c[lv] for c in chunks]) for lv in range(len(chunks[0]))]
            avg = [m.mean(dim=(2, 3, 4)).numpy() for m in maps]
            reads = {f"avg level {lv}": a for lv, a in enumerate(avg)}
            reads["multiscale (levels 0-4)"] = np.concatenate(avg, 1)
            reads["multiscale (levels 0-3)"] = np.concatenate(avg[:4], 1)
            reads["spatial 2x2x2 (levels 0-4)"] = np.concatenate(
                [torch.nn.functional.adaptive_avg_pool3d(m, 2).flatten(1).numpy() for m in maps], 1)
            scores = {k: {"auc_mean": round(float(np.mean(v)), 3), "auc_per_shuffle": [round(a, 3) for a in v],
                          "features": int(f.shape[1])} for k, f in reads.items() for v in [_auc(f, y)]}
            runs.append({"root": str(root), "subjects": len(subs), "init_seed": seed,
                         "pretrained": bool(info.get("pretrained")), "seconds": round(time.perf_counter() - t0, 1),
                         "readouts": scores})
            print(root.name, "init", seed, {k: v["auc_mean"] for k, v in scores.items()}, flush=True)
    out = {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "pipeline": args.pipeline,
           "classifier": "StandardScaler + LogisticRegression(C=1), stratified 5-fold, 3 shuffles",
           "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Proxy for issue 13's must-shows (NOT the README demo path): the group level (fast preset, default
statistics, through the CLI) on write_synthetic_maps' template-space maps, 20 subjects, seed 11,
with the synthetic effect region written as the truth mask and FD confounds (ADHD 0.6, TD 0.1 mm when
``motion``, + U(0, 0.3)) as test_group_stats writes them. Prints a JSON summary.

    nice -n 5 .venv/bin/python benchmarks/group_stats_synthetic.py /tmp/gss/effect 0.08 motion
    nice -n 5 .venv/bin/python benchmarks/group_stats_synthetic.py /tmp/gss/null 0 none
"""
import json
import os
import resource
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_adhd import derivatives as dv
from bids_adhd.config import load_pipeline
from bids_adhd.simulate_maps import synthetic_effect_region, write_synthetic_maps
from bids_adhd.dmri.template import template_grid
from bids_adhd.cli import main

work, effect, motion = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "motion"
bids, out = work / "bids", work / "out"
cfg = load_pipeline("fast")
rows = write_synthetic_maps(out, bids, n_subjects=20, seed=11, effect=effect, template_cfg=cfg.template)
shape, aff = template_grid(cfg.template)
t = bids / "derivatives" / "truth"; t.mkdir(parents=True, exist_ok=True)
nib.save(nib.Nifti1Image(synthetic_effect_region(shape, aff).astype(np.uint8), aff),
         str(t / "space-MNI152NLin2009aSym_desc-effect_mask.nii.gz"))
rng = np.random.default_rng(0)
for r in rows:
    hi = motion and r["diagnosis"] == "ADHD"
    fd = (0.6 if hi else 0.1) + rng.uniform(0, 0.3, 10)
    dv.write_tsv(dv.confounds(out, dv.Source(subject=r["participant_id"][4:])),
                 {"framewise_displacement": ["n/a"] + [float(v) for v in fd[1:]]})
t0 = time.perf_counter(); l0 = os.getloadavg()[0]
code = main([str(bids), str(out), "group", "--pipeline", "fast", "-q", "--skip-bids-validation"])
ru = resource.getrusage(resource.RUSAGE_SELF)
m = json.loads((out / "group" / "metrics.json").read_text())
perm = m["permutation"]; perm.get("null_auc", {}).pop("values", None)
print(json.dumps({"exit": code, "wall_s": time.perf_counter() - t0, "cpu_s": ru.ru_utime + ru.ru_stime,
                  "load": [l0, os.getloadavg()[0]], "pooled": m["pooled"], "permutation": perm,
                  "confounds": {k: m["confounds"][k] for k in ("alone", "flagged")},
                  "saliency": m.get("saliency"), "timing": m["timing"]}, indent=1, default=str))

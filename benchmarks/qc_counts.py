"""The QC reports' outlier counts against the simulator's truth (issue 11).

For every subject of a participant-level output made from simulated data, read the RENDERED
report (``sub-XX.html``: what a user sees) and compare its "Outlier volumes" (FD above the report's
threshold) and "Dropout slices" with the truth: FD of the true rigid motion
(``derivatives/truth/.../desc-motion_timeseries.json`` ``Matrices``, Power's FD with the same
radius) above the same threshold, and the planted dropout slices. Writes
``benchmarks/results/qc_counts.json``.

    python benchmarks/qc_counts.py BIDS_DIR OUTPUT_DIR [--out results/qc_counts.json]
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

RESULT = Path(__file__).resolve().parent / "results" / "qc_counts.json"


def report_numbers(html: Path) -> dict:
    text = " ".join(re.sub(r"<[^>]+>", " ", html.read_text()).split())

    def grab(pattern: str) -> float:
        m = re.search(pattern, text)
        if m is None:
            raise SystemExit(f"{html}: no match for {pattern!r} (report layout changed?)")
        return float(m.group(1))
    return {"outlier_volumes": int(grab(r"Outlier volumes (\d+) volumes with FD")),
            "dropout_slices": int(grab(r"Dropout slices (\d+) slices")),
            "fd_threshold_mm": grab(r"FD threshold ([0-9.]+) mm"),
            "fd_radius_mm": grab(r"FD sphere radius ([0-9.]+) mm")}


def truth_numbers(bids: Path, sub: str, threshold: float, radius: float) -> dict:
    import nibabel as nib

    from bids_adhd.dmri.motion import framewise_displacement, rigid_params

    t = bids / "derivatives" / "truth" / f"sub-{sub}" / "dwi" / f"sub-{sub}_"
    M = np.array(json.loads(Path(f"{t}desc-motion_timeseries.json").read_text())["Matrices"], float)
    img = nib.load(str(bids / f"sub-{sub}" / "dwi" / f"sub-{sub}_dwi.nii.gz"))
    fd = framewise_displacement(rigid_params(M, img.shape[:3], img.affine), radius)
    drops = json.loads(Path(f"{t}desc-dropout_timeseries.json").read_text())["Slices"]
    return {"outlier_volumes": int((fd > threshold).sum()), "dropout_slices": len(drops)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bids", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--out", type=Path, default=RESULT)
    a = ap.parse_args()
    subjects = {}
    for html in sorted(a.output.glob("sub-*.html")):
        sub = html.stem[4:]
        rep = report_numbers(html)
        tru = truth_numbers(a.bids, sub, rep["fd_threshold_mm"], rep["fd_radius_mm"])
        subjects[sub] = {"report": rep, "truth": tru}
        print(f"sub-{sub}: outlier volumes {rep['outlier_volumes']} (truth {tru['outlier_volumes']}), "
              f"dropout slices {rep['dropout_slices']} (truth {tru['dropout_slices']})", flush=True)
    if not subjects:
        raise SystemExit(f"no sub-*.html reports in {a.output}")
    diff = {k: max(abs(s["report"][k] - s["truth"][k]) for s in subjects.values())
            for k in ("outlier_volumes", "dropout_slices")}
    out = {"command": "python benchmarks/qc_counts.py " + " ".join(map(str, (a.bids, a.output))),
           "subjects": subjects, "max_abs_diff": diff, "n": len(subjects),
           "within_1_every_subject": {k: v <= 1 for k, v in diff.items()}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"max |report - truth|: {diff} over {len(subjects)} subjects -> {a.out}")


if __name__ == "__main__":
    main()

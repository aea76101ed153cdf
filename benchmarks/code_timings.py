"""Timings that code comments used to quote, measured in one place (issue 16, item 8).

The comments now point here (``benchmarks/results/code_timings.{json,md}``)
instead of carrying numbers nobody re-measures. Four measurements:

gzip          one demo-size DWI (``bids_adhd simulate --size demo``, sub-01)
              written with ``derivatives.write_nifti`` as ``.nii.gz`` at gzip level 1
              (``derivatives.NIFTI_GZIP_LEVEL``) and at 6 (nibabel's default), and
              as ``.nii`` (the work dir's ``interfaces.dipy._save``); CPU s and bytes.
torch_import  ``import torch`` in a fresh interpreter (its CPU s); why
              ``gibbs._resolve_device`` does not import torch just to look.
conv3d        the ``fast`` preset's classifier (CT-FM truncated after level 3,
              random init, eval) on a batch of 4 x 1 x 32^3, one torch thread:
              contiguous vs ``channels_last_3d`` (``train.memory_format``).
registration  ``register_to_template`` on the demo subject's native FA
              (OUTPUT_DIR/sub-01/dwi/sub-01_model-tensor_param-fa_dwimap.nii.gz):
              the ``fast`` preset's template settings (4 mm target, two levels) vs
              the same with a 2 mm target vs the default preset's registration
              settings (2 mm, three levels) on the fast grid; CPU s and similarity.

Usage (the machine may be shared: the load average is recorded around each)::

    python benchmarks/code_timings.py BIDS_DIR OUTPUT_DIR

with BIDS_DIR from ``bids_adhd simulate BIDS_DIR --subjects 2 --seed 11 --size demo``
and OUTPUT_DIR from ``bids_adhd BIDS_DIR OUTPUT_DIR participant --participant-label 01
--pipeline fast``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(fn, repeat: int = 1):
    """(result of the last call, best wall s, best CPU s of this process) over ``repeat`` calls."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        best_wall, best_cpu = min(best_wall, time.perf_counter() - w), min(best_cpu, time.process_time() - c)
    return out, round(best_wall, 3), round(best_cpu, 3)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def gzip_levels(bids: Path) -> dict:
    import nibabel as nib

    from bids_adhd import derivatives as dv

    img = nib.load(str(bids / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"))
    img = nib.Nifti1Image(np.asarray(img.get_fdata(dtype=np.float32)), img.affine)
    out = {"input": f"sub-01 DWI as float32, shape {list(img.shape)}, {img.dataobj.nbytes} bytes",
           "load_before": _load()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, level in (("nii_gz_level_1", 1), ("nii_gz_level_6", 6), ("nii", None)):
            path = Path(tmp) / ("x.nii" if level is None else f"x{level}.nii.gz")
            if level is not None:
                dv.NIFTI_GZIP_LEVEL, saved = level, dv.NIFTI_GZIP_LEVEL
            _, wall, cpu = _timed(lambda: dv.write_nifti(path, img), repeat=2)
            if level is not None:
                dv.NIFTI_GZIP_LEVEL = saved
            out[name] = {"wall_s": wall, "cpu_s": cpu, "bytes": path.stat().st_size}
    out["load_after"] = _load()
    return out


def torch_import() -> dict:
    code = "import time; c = time.process_time(); import torch; print(time.process_time() - c)"
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
            for _ in range(3)]
    return {"cpu_s_each": [round(r, 3) for r in runs], "load": _load()}


def conv3d_memory_format() -> dict:
    import torch

    from bids_adhd.config import load_pipeline
    from bids_adhd.learn.classifier import build_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _ = build_model(dataclasses.replace(load_pipeline("fast").model, pretrained=False))
    model.eval()
    x = torch.rand(4, 1, 32, 32, 32)
    out = {"load_before": _load()}
    with torch.no_grad():
        for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last_3d", torch.channels_last_3d)):
            m = model.to(memory_format=fmt)
            xi = x.contiguous(memory_format=fmt)
            m(xi)                                                 # warm-up (oneDNN primitive cache)
            _, wall, cpu = _timed(lambda: m(xi), repeat=3)
            out[name] = {"wall_s": wall, "cpu_s": cpu}
    out["load_after"] = _load()
    return out


def registration(output_dir: Path) -> dict:
    import nibabel as nib

    from bids_adhd.config import TemplateConfig, load_pipeline
    from bids_adhd.dmri.template import register_to_template

    fa_img = nib.load(str(output_dir / "sub-01" / "dwi" / "sub-01_model-tensor_param-fa_dwimap.nii.gz"))
    mask = np.asarray(nib.load(str(output_dir / "sub-01" / "dwi" / "sub-01_desc-brain_mask.nii.gz")).dataobj) > 0
    fa = np.asarray(fa_img.get_fdata(dtype=np.float32))
    fast, default = load_pipeline("fast").template, TemplateConfig()
    variants = {"fast (4 mm target, 2 levels)": fast,
                "fast with a 2 mm target": dataclasses.replace(fast, registration_mm=2.0),
                "fast grid, default registration (2 mm, 3 levels)": dataclasses.replace(
                    fast, registration_mm=default.registration_mm, affine_level_iters=default.affine_level_iters,
                    affine_factors=default.affine_factors, affine_sigmas=default.affine_sigmas)}
    out = {"load_before": _load()}
    for name, cfg in variants.items():
        register_to_template(fa, fa_img.affine, mask, cfg)       # warm-up: builds and caches the target
        reg, wall, cpu = _timed(lambda: register_to_template(fa, fa_img.affine, mask, cfg))
        out[name] = {"wall_s": wall, "cpu_s": cpu, "similarity": round(float(reg["similarity"]), 4)}
    out["load_after"] = _load()
    return out


def markdown(res: dict) -> str:
    lines = ["# Timings the code comments point to", "", f"`{res['command']}` at commit {res['commit']}, "
             f"{res['date']}, {res['cpus']} CPUs, shared machine (load averages in the JSON).", ""]
    for key in ("gzip", "conv3d", "registration"):
        lines += [f"## {key}", "", "| variant | wall s | CPU s | other |", "|---|---:|---:|---|"]
        for name, v in res[key].items():
            if isinstance(v, dict):
                other = ", ".join(f"{k} {v[k]}" for k in v if k not in ("wall_s", "cpu_s"))
                lines.append(f"| {name} | {v['wall_s']} | {v['cpu_s']} | {other} |")
        lines.append("")
    lines += ["## torch import", "", f"CPU s of `import torch` in 3 fresh processes: {res['torch_import']['cpu_s_each']}",
              ""]
    if res.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    bids, output_dir = (Path(a) for a in (argv or sys.argv[1:])[:2])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    res = {"command": "python benchmarks/code_timings.py BIDS_DIR OUTPUT_DIR", "commit": commit,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
           "gzip": gzip_levels(bids), "torch_import": torch_import(), "conv3d": conv3d_memory_format(),
           "registration": registration(output_dir)}
    (RESULTS / "code_timings.json").write_text(json.dumps(res, indent=1) + "\n")
    (RESULTS / "code_timings.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

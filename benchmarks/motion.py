"""Motion + eddy correction against the simulator's truth (issue 11), per preset.

Simulates ``--subjects`` demo-size subjects (``bids_adhd simulate``: head motion on 3-4
volumes, eddy-current distortion of every DW volume, 2-4 slice dropouts, all with truth
files), then per subject and per ``--pipeline`` preset runs the participant-level numerics
(premask, denoising, [Gibbs], motion correction, brain mask, DTI) three ways: the new
correction (``bids_adhd.dmri.motion.correct_motion`` with the preset's settings), none
(``preproc.motion: false``), and optionally (``--old REF``) the motion correction of git
revision REF (today's: 12-dof mutual information to the mean b0), loaded from git.

Per subject and preset it records: per-volume RMS displacement error over the truth brain
mask (mm) of the estimated reference -> volume map against the truth (eddy ∘ motion), its
maximum; FD > 0.5 mm flags against the truth's (precision, recall); dropout slices found
against the planted ones (recall, false slices); native FA vs truth FA (Pearson r over the
truth brain mask) with / without / old correction; wall and CPU time of the motion step.

Writes ``benchmarks/results/motion.json`` and ``motion.md``. From the repository root:
    nice -n 5 .venv/bin/python benchmarks/motion.py --subjects 10 --pipeline fast default --old main
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
RESULT = ROOT / "benchmarks" / "results" / "motion.json"


def _cpu():
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def old_module(ref: str):
    """The motion module of git revision ``ref`` (today's correction), imported from a temp file."""
    if Path(ref).is_file():                     # a saved copy (a run from a snapshot without .git)
        src = Path(ref).read_text()
    else:
        src = subprocess.run(["git", "show", f"{ref}:bids_adhd/dmri/motion.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    folder = Path(tempfile.mkdtemp())
    path = folder / "motion_old.py"
    path.write_text(src.replace("from ..errors", "from bids_adhd.errors").replace("from ._", "from bids_adhd.dmri._")
                    .replace("from .mask", "from bids_adhd.dmri.mask"))
    # importable by name: the worker processes (forkserver) unpickle its functions
    sys.path.insert(0, str(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])
    import motion_old

    return motion_old


def truth_of(bids: Path, sub: str) -> dict:
    import nibabel as nib

    t = bids / "derivatives" / "truth" / f"sub-{sub}" / "dwi"
    motion = json.loads((t / f"sub-{sub}_desc-motion_timeseries.json").read_text())
    eddy = json.loads((t / f"sub-{sub}_desc-eddy_xfm.json").read_text())
    drop = json.loads((t / f"sub-{sub}_desc-dropout_timeseries.json").read_text())
    M, E = np.array(motion["Matrices"], float), np.array(eddy["Matrices"], float)
    return {"M": M, "A": np.einsum("nij,njk->nik", E, M), "dropouts": {tuple(x) for x in drop["Slices"]},
            "fa": nib.load(str(t / f"sub-{sub}_model-tensor_param-fa_dwimap.nii.gz")).get_fdata(),
            "brain": nib.load(str(t / f"sub-{sub}_desc-brain_mask.nii.gz")).get_fdata() > 0}


def preprocess(bids: Path, sub: str, cfg, nprocs: int):
    """Raw -> premask -> denoise -> [unring], as the workflow does (before motion); also returns the
    workflow's ``undenoised`` reader (volume i of the raw series, [unrung])."""
    import nibabel as nib
    from scipy.ndimage import binary_dilation

    from bids_adhd.dmri.denoise import denoise
    from bids_adhd.dmri.gibbs import unring
    from bids_adhd.dmri.mask import brain_mask

    dwi = bids / f"sub-{sub}" / "dwi" / f"sub-{sub}_dwi.nii.gz"
    img = nib.load(str(dwi))
    raw = np.asarray(img.get_fdata(dtype=np.float32))
    bvals = np.loadtxt(str(dwi).replace(".nii.gz", ".bval"), ndmin=1)
    bvecs = np.loadtxt(str(dwi).replace(".nii.gz", ".bvec"), ndmin=2).T
    pm, _ = brain_mask(raw, bvals, cfg.b0_threshold, cfg.mask_median_radius, cfg.mask_numpass, nprocs=nprocs)
    pm = binary_dilation(pm, iterations=cfg.denoise_patch_radius + 2)
    den = denoise(raw, cfg.denoise, bvals=bvals, mask=pm, patch_radius=cfg.denoise_patch_radius, nprocs=nprocs,
                  stride=cfg.denoise_stride)
    den = den[0] if isinstance(den, tuple) else den
    if cfg.gibbs:
        den = unring(den, slice_axis=cfg.gibbs_slice_axis, n_points=cfg.gibbs_n_points, nprocs=nprocs)
    def undenoised(i):
        vol = raw[..., i]
        return unring(vol, slice_axis=cfg.gibbs_slice_axis, n_points=cfg.gibbs_n_points, nprocs=1) if cfg.gibbs \
            else vol

    return np.asarray(den, np.float32), img.affine, bvals, bvecs, (undenoised if cfg.denoise != "none" else None)


def fa_corr(data, bvals, bvecs, cfg, truth, nprocs):
    from bids_adhd.dmri.dti import fit_dti
    from bids_adhd.dmri.mask import brain_mask

    mask, _ = brain_mask(data, bvals, cfg.b0_threshold, cfg.mask_median_radius, cfg.mask_numpass)
    fit = fit_dti(data, bvals, bvecs, mask=mask, method=cfg.dti_fit, bmax=cfg.dti_bmax,
                  b0_threshold=cfg.b0_threshold, nprocs=nprocs)
    fa = np.nan_to_num(np.asarray(fit["fa"], float))
    m = truth["brain"]
    return float(np.corrcoef(fa[m], truth["fa"][m])[0, 1])


def rms_errors(A_est, A_true, brain, affine):
    """Per volume: RMS over the brain voxels of |A_est x - A_true x| (mm)."""
    idx = np.argwhere(brain).astype(float)
    pts = np.c_[idx @ affine[:3, :3].T + affine[:3, 3], np.ones(len(idx))]
    return np.array([float(np.sqrt((np.linalg.norm(pts @ (a - b)[:3].T, axis=1) ** 2).mean()))
                     for a, b in zip(A_est, A_true)])


def motion_kwargs(cfg, nprocs, eddy_axis):
    """``correct_motion`` keyword arguments of a preset (as the MotionCorrect interface passes them;
    ``undenoised`` apart)."""
    return dict(b0_threshold=cfg.b0_threshold, level_iters=tuple(cfg.motion_level_iters),
                factors=tuple(cfg.motion_factors), sigmas=tuple(cfg.motion_sigmas), nprocs=nprocs,
                rounds=cfg.motion_rounds, eddy_axis=eddy_axis if cfg.motion_eddy else None,
                slice_axis=cfg.motion_slice_axis, outliers=cfg.motion_outliers, outlier_z=cfg.motion_outlier_z,
                fd_radius=cfg.fd_radius_mm, sampling=cfg.motion_sampling, min_samples=cfg.motion_min_samples,
                head_margin=cfg.motion_head_margin, eddy_model=cfg.motion_eddy_model)


def _timed(fn):
    t, c = time.perf_counter(), _cpu()
    out = fn()
    return out, time.perf_counter() - t, _cpu() - c


def run_one(bids, sub, name, cfg, nprocs, old):
    """One subject, one preset: the record described in the module doc."""
    from bids_adhd.dmri.motion import correct_motion, framewise_displacement, rigid_params

    truth = truth_of(bids, sub)
    data, affine, bvals, bvecs, undenoised = preprocess(bids, sub, cfg, nprocs)
    rec = {"subject": sub, "pipeline": name, "fa_r_none": fa_corr(data, bvals, bvecs, cfg, truth, nprocs)}
    res, rec["motion_wall_s"], rec["motion_cpu_s"] = _timed(
        lambda: correct_motion(data, affine, bvals, bvecs, undenoised=undenoised,
                               **motion_kwargs(cfg, nprocs, eddy_axis=1)))
    err = rms_errors(res["affines"], truth["A"], truth["brain"], affine)
    err_rigid = rms_errors(res["motion_affines"], truth["M"], truth["brain"], affine)
    fd_true = framewise_displacement(rigid_params(truth["M"], data.shape[:3], affine), cfg.fd_radius_mm)
    t_flag, e_flag = fd_true > cfg.fd_outlier_mm, res["fd"] > cfg.fd_outlier_mm
    found = {(int(v), int(k)) for v, k in np.argwhere(res["dropouts"])}
    rec.update(rounds=res["rounds"], rms_err_mm=[round(float(e), 4) for e in err],
               rms_err_mm_max=float(err.max()), rms_err_mm_median=float(np.median(err)),
               rigid_rms_err_mm_max=float(err_rigid.max()),
               fd_true_outliers=int(t_flag.sum()), fd_est_outliers=int(e_flag.sum()),
               fd_tp=int((t_flag & e_flag).sum()), fd_fp=int((~t_flag & e_flag).sum()),
               fd_fn=int((t_flag & ~e_flag).sum()), dropouts_true=sorted(truth["dropouts"]),
               dropouts_found=sorted(found), dropouts_tp=len(found & truth["dropouts"]),
               dropouts_false=len(found - truth["dropouts"]), resampled=int(res["resampled"].sum()),
               fa_r_new=fa_corr(res["data"], bvals[res["kept"]], res["bvecs"], cfg, truth, nprocs))
    if old is not None:
        o, rec["old_motion_wall_s"], rec["old_motion_cpu_s"] = _timed(lambda: old.correct_motion(
            data, affine, bvals, bvecs, cfg.b0_threshold, tuple(cfg.motion_level_iters), tuple(cfg.motion_factors),
            tuple(cfg.motion_sigmas), nprocs=nprocs, sampling=cfg.motion_sampling,
            min_samples=cfg.motion_min_samples))
        e_old = rms_errors(o["affines"], truth["A"], truth["brain"], affine)
        o_flag = o["fd"] > cfg.fd_outlier_mm
        rec.update(old_rms_err_mm_max=float(e_old.max()), old_fd_est_outliers=int(o_flag.sum()),
                   old_fd_tp=int((t_flag & o_flag).sum()), fa_r_old=fa_corr(o["data"], bvals, o["bvecs"], cfg,
                                                                             truth, nprocs))
    return rec


def summarise(recs):
    out = {}
    for name in sorted({r["pipeline"] for r in recs}):
        rs = [r for r in recs if r["pipeline"] == name]
        tp, fp, fn = (sum(r[k] for r in rs) for k in ("fd_tp", "fd_fp", "fd_fn"))
        d_true = sum(len(r["dropouts_true"]) for r in rs)
        s = {"subjects": len(rs),
             "rms_err_mm_max_over_volumes": max(r["rms_err_mm_max"] for r in rs),
             "rms_err_mm_median_of_subject_max": float(np.median([r["rms_err_mm_max"] for r in rs])),
             "rigid_rms_err_mm_max": max(r["rigid_rms_err_mm_max"] for r in rs),
             "fd_precision": tp / (tp + fp) if tp + fp else None, "fd_recall": tp / (tp + fn) if tp + fn else None,
             "fd_true_outliers": tp + fn, "dropout_recall": sum(r["dropouts_tp"] for r in rs) / max(d_true, 1),
             "dropout_false_per_subject_max": max(r["dropouts_false"] for r in rs),
             "dropouts_planted": d_true,
             "fa_new_ge_none_every_subject": all(r["fa_r_new"] >= r["fa_r_none"] for r in rs),
             "fa_r_new_median": float(np.median([r["fa_r_new"] for r in rs])),
             "fa_r_none_median": float(np.median([r["fa_r_none"] for r in rs])),
             "motion_wall_s_median": float(np.median([r["motion_wall_s"] for r in rs])),
             "motion_cpu_s_median": float(np.median([r["motion_cpu_s"] for r in rs]))}
        if all("fa_r_old" in r for r in rs):
            s.update(fa_r_old_median=float(np.median([r["fa_r_old"] for r in rs])),
                     fa_new_gt_old_every_subject=all(r["fa_r_new"] > r["fa_r_old"] for r in rs),
                     old_rms_err_mm_max=max(r["old_rms_err_mm_max"] for r in rs),
                     old_fd_outliers_flagged=sum(r["old_fd_est_outliers"] for r in rs),
                     old_motion_wall_s_median=float(np.median([r["old_motion_wall_s"] for r in rs])),
                     old_motion_cpu_s_median=float(np.median([r["old_motion_cpu_s"] for r in rs])))
        out[name] = s
    return out


def main(argv=None) -> int:
    from bids_adhd.config import load_pipeline
    from bids_adhd.simulate import simulate_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=10)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--pipeline", nargs="+", default=["fast", "default"])
    ap.add_argument("--old", default=None, help="git revision whose motion correction to compare (e.g. main)")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="keep the simulated data here (re-used if present)")
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    old = old_module(args.old) if args.old else None
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_motion_"))
    bids = work / "bids"
    if not bids.is_dir():
        simulate_dataset(bids, n_subjects=args.subjects, seed=args.seed, size="demo", n_jobs=args.nprocs)
    head = {"command": " ".join(["benchmarks/motion.py"] + (argv or sys.argv[1:])),
            "data": f"{args.subjects} subjects, bids_adhd simulate --size demo --seed {args.seed} (motion, eddy, "
                    "dropouts on)", "nprocs": args.nprocs, "cpu_count": os.cpu_count(),
            "load_avg_at_start": os.getloadavg(),
            "code": os.environ.get("BENCH_CODE") or subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
            "old": os.environ.get("BENCH_OLD") or args.old}
    recs = []
    for i in range(1, args.subjects + 1):
        sub = f"{i:02d}"
        for name in args.pipeline:
            recs.append(run_one(bids, sub, name, load_pipeline(name).preproc, args.nprocs, old))
            recs[-1]["load_avg"] = os.getloadavg()
            print(json.dumps({k: v for k, v in recs[-1].items() if k not in ("rms_err_mm",)}), flush=True)
            res = {**head, "summary": summarise(recs), "subjects": recs}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(res, indent=1) + "\n")
    write_md(args.out.with_suffix(".md"), res)
    return 0


def write_md(path: Path, res: dict) -> None:
    lines = [f"# Motion + eddy correction vs the simulator's truth\n", f"`{res['command']}` (code {res['code'][:10]}, "
             f"{res['nprocs']} processes, load average at start {res['load_avg_at_start']}: a shared machine)\n",
             f"Data: {res['data']}\n", "| preset | " + " | ".join(next(iter(res["summary"].values()))) + " |",
             "|---|" + "---|" * len(next(iter(res["summary"].values())))]
    for name, s in res["summary"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                                                for v in s.values()) + " |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

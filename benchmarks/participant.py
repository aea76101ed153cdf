"""Benchmark the participant-level numerics against MRtrix3 (issue "Speed").

One simulated subject (``bids_adhd.simulate``, ``--size hbn`` by default:
128 x 128 x 84 voxels of 1.8 mm, 5 b0 + 2 x 64 directions, int16 with Rician
noise, per-volume motion) is processed twice on the same input:

ours      premask (median_otsu of the raw mean b0, dilated by patch radius + 2,
          as the workflow does) -> MP-PCA (bids_adhd.dmri.denoise.mppca, inside
          the premask) -> Gibbs unringing (gibbs.unring) -> motion + eddy correction
          (motion.correct_motion, called as the workflow's MotionCorrect node calls it:
          the preset's settings, the eddy stage along the sidecar's
          PhaseEncodingDirection, moved volumes re-registered from the undenoised
          series read from disk) -> brain mask (mask.brain_mask) -> DTI WLS on
          b <= 1500 (dti.fit_dti)
mrtrix3   dwidenoise -> mrdegibbs -> dwiextract -fslgrad -shells (b <= 1500) ->
          dwi2tensor -mask (our final mask) -> tensor2metric, -nthreads N

``ours_s`` (compared with ``mrtrix3_s``) = the steps MRtrix3 also does:
premask + denoise + unring + tensor fit (the premask is counted because our
denoising needs it). ``ours_total_s`` adds motion correction and the final
mask. ``mrtrix3_s`` uses dwidenoise as users run it by default (whole volume);
``mrtrix3_masked_s`` gives dwidenoise our premask (``-mask``) as well.

Agreement (all in the final brain mask unless said otherwise):
* DIPY reference functions on the same input: MP-PCA on a central sub-block
  (all volumes), Gibbs on whole slices of a few volumes (max |diff|).
* FA: ``dwi2tensor -ols -iter 0`` vs DIPY OLS on identical input (our
  unrung data, b <= 1500): an exact comparison; MRtrix3's default (IWLS, 2
  reweightings) vs DIPY WLS (one reweighting); the two full chains; each
  chain vs the simulator's true FA.
* Motion + eddy correction vs the simulator's truth: per-volume RMS displacement
  error over the truth brain mask (mm), as benchmarks/motion.py measures it.

Times: wall and CPU (user + sys, this process and its children) and peak
memory (RSS, sampled every 0.1 s) per step; ``ours_total_s`` is the whole
subject (every step, motion correction and mask included), ``step_ratios``
each of our steps over its MRtrix3 counterpart in the same run (wall and
CPU). The machine may be shared: each MRtrix3 step runs right after our
matching step, the load averages around each step are recorded, and the
CPU-time ratio is reported next to the wall-time ratio. Like the pipeline
(one step per process), the script frees each step's input once the next
step has its output, keeping only small crops for the DIPY checks, so a
step's peak RSS is that step's, not the sum of the chain's arrays.

Output: ``--out``/participant.{json,md} for ``--size hbn``,
participant_demo.{json,md} for ``--size demo``.

Run (from the repository root, on an idle machine; ~1 h on 2 cores for hbn,
a few minutes for demo):
    .venv/bin/python benchmarks/participant.py --size hbn --nprocs 2
    .venv/bin/python benchmarks/participant.py --size demo --nprocs 2 --work /tmp/bench_demo
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# benchmarks/motion.py, a sibling script: truth files, RMS displacement errors, the preset's correct_motion settings
import motion as bench_motion  # noqa: E402


# --- measurement helpers ---------------------------------------------------------

class _Sampler:
    """Context manager that calls ``sample()`` on entry, every ``period`` seconds in a
    background thread (a failed sample is skipped), and on exit."""

    period = 1.0

    def sample(self):
        raise NotImplementedError

    def _safe_sample(self):
        try:
            self.sample()
        except Exception:
            pass

    def __enter__(self):
        self._stop = threading.Event()
        self._safe_sample()

        def loop():
            while not self._stop.wait(self.period):
                self._safe_sample()

        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self._safe_sample()


class PeakRSS(_Sampler):
    """Peak memory, sampled every 0.1 s: of this process (RSS) + its children (USS:
    their own pages, so the pages a forked worker shares with this process are not
    counted twice), or, with ``pid``, of that one process (RSS)."""

    period = 0.1

    def __init__(self, pid=None):
        import psutil

        self.proc = psutil.Process(pid)
        self.own = pid is None
        self.peak = 0

    def sample(self):
        total = self.proc.memory_info().rss
        if self.own:
            for ch in self.proc.children(recursive=True):
                try:
                    total += ch.memory_full_info().uss
                except Exception:
                    pass
        self.peak = max(self.peak, total)


def _proc_stat():
    """Machine-wide CPU jiffies from /proc/stat: (total, idle + iowait, steal), or None."""
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    v += [0] * (8 - len(v))
    return sum(v), v[3] + v[4], v[7]


class MachineLoad(_Sampler):
    """What the rest of the (shared) machine did during a step: the load average
    (sampled every second: mean and max) and the machine-wide busy CPU time from
    /proc/stat, minus this step's own CPU time = the other users' CPU time."""

    def sample(self):
        self.samples.append(os.getloadavg()[0])

    def __enter__(self):
        self.samples = []
        self.s0 = _proc_stat()
        self.t0 = time.perf_counter()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.s1 = _proc_stat()
        self.wall = time.perf_counter() - self.t0

    def summary(self, own_cpu_s):
        out = {"load_mean": float(np.mean(self.samples)), "load_max": float(np.max(self.samples))}
        if self.s0 and self.s1:
            tck = os.sysconf("SC_CLK_TCK")
            total, idle, steal = (b - a for a, b in zip(self.s0, self.s1))
            busy = (total - idle) / tck
            ncpu = os.cpu_count() or 1
            out.update({"machine_busy_cpu_s": busy, "others_cpu_s": max(0.0, busy - own_cpu_s),
                        "others_cpu_share": max(0.0, busy - own_cpu_s) / max(self.wall * ncpu, 1e-9),
                        "steal_s": steal / tck})
        return out


def cpu_now():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def timed(name, fn, steps):
    load0 = os.getloadavg()[0]
    with MachineLoad() as ml:
        t0, c0 = time.perf_counter(), cpu_now()
        with PeakRSS() as mem:
            out = fn()
        rec = {"wall_s": time.perf_counter() - t0, "cpu_s": cpu_now() - c0, "peak_rss_mb": mem.peak / 2**20,
               "load_before": load0, "load_after": os.getloadavg()[0]}
    rec.update(ml.summary(rec["cpu_s"]))
    steps[name] = rec
    print(f"[ours] {name:10s} wall {rec['wall_s']:8.1f} s  cpu {rec['cpu_s']:8.1f} s  "
          f"peak {rec['peak_rss_mb']:7.0f} MB  load {load0:.1f}->{rec['load_after']:.1f} "
          f"(mean {rec['load_mean']:.1f}, others {100 * rec.get('others_cpu_share', 0):.0f} % CPU)", flush=True)
    return out


def run_cmd(name, cmd, steps):
    """Run a command: wall time; CPU time of that child alone (os.wait4); peak RSS
    of the child sampled every 0.1 s (ru_maxrss of a child forked from this big
    process would count the parent's pages)."""
    load0 = os.getloadavg()[0]
    with MachineLoad() as ml:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with PeakRSS(p.pid) as mem:
            err = p.stderr.read().decode(errors="replace")       # until the child closes it (exits)
            _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.stderr.close()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {err[-2000:]}")
    rec = {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": mem.peak / 2**20,
           "load_before": load0, "load_after": os.getloadavg()[0], "command": " ".join(map(str, cmd))}
    rec.update(ml.summary(rec["cpu_s"]))
    steps[name] = rec
    print(f"[mrtrix3] {name:14s} wall {wall:8.1f} s  cpu {rec['cpu_s']:8.1f} s  "
          f"peak {rec['peak_rss_mb']:7.0f} MB  load {load0:.1f}->{rec['load_after']:.1f} "
          f"(mean {rec['load_mean']:.1f}, others {100 * rec.get('others_cpu_share', 0):.0f} % CPU)", flush=True)
    return rec


def machine_info():
    import dipy
    import scipy
    import torch

    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = None
    mr = shutil.which("dwidenoise")
    mrver = subprocess.run(["dwidenoise", "-version"], capture_output=True, text=True).stdout.splitlines()[0] \
        if mr else None
    return {"platform": platform.platform(), "cpu": cpu, "cpus_usable": len(os.sched_getaffinity(0)),
            "memory_gb": mem, "python": platform.python_version(), "numpy": np.__version__,
            "scipy": scipy.__version__, "torch": torch.__version__, "dipy": dipy.__version__,
            "mrtrix3": mrver, "load_avg_at_start": os.getloadavg()}


def code_info():
    """The commit benchmarked and any uncommitted change to the numerics or this script."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    dirty = git("status", "--porcelain", "--", "bids_adhd/dmri", "benchmarks/participant.py")
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": dirty.splitlines() if dirty else []}


# --- comparisons ---------------------------------------------------------------------

def load_summary(recs):
    """Wall-weighted mean load average and the other users' share of the machine's CPUs over steps."""
    wall = sum(r["wall_s"] for r in recs)
    out = {"wall_s": wall, "load_mean": sum(r["load_mean"] * r["wall_s"] for r in recs) / max(wall, 1e-9),
           "load_max": max(r["load_max"] for r in recs)}
    if all("others_cpu_s" in r for r in recs):
        ncpu = os.cpu_count() or 1
        out["others_cpu_s"] = sum(r["others_cpu_s"] for r in recs)
        out["others_cpu_share"] = out["others_cpu_s"] / max(wall * ncpu, 1e-9)
    return out


def fa_agreement(a, b, mask):
    a, b = np.asarray(a, float)[mask], np.asarray(b, float)[mask]
    d = np.abs(a - b)
    return {"corr": float(np.corrcoef(a, b)[0, 1]), "median_abs_diff": float(np.median(d)),
            "p99_abs_diff": float(np.quantile(d, 0.99)), "max_abs_diff": float(d.max()),
            "n_abs_diff_gt_1e-3": int((d > 1e-3).sum()), "n_voxels": int(d.size)}


def load(path):
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)


def save(arr, affine, path, dtype=np.float32):
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(arr, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return str(path)


def write_fsl(bvals, bvecs, stem):
    np.savetxt(f"{stem}.bval", np.asarray(bvals)[None], fmt="%g")
    np.savetxt(f"{stem}.bvec", np.asarray(bvecs).T, fmt="%.8f")
    return f"{stem}.bvec", f"{stem}.bval"


def dipy_checks(sub, den_input_dtype, gsub):
    """Our MP-PCA and unringing vs DIPY's functions on the same input: ``sub`` a raw sub-block (all
    volumes), ``gsub`` whole slices of a few denoised volumes (the unringing input)."""
    import warnings

    from dipy.denoise.gibbs import gibbs_removal
    from dipy.denoise.localpca import mppca as dipy_mppca
    from threadpoolctl import threadpool_limits

    from bids_adhd.dmri.denoise import mppca
    from bids_adhd.dmri.gibbs import unring

    out = {}
    rng = float(np.ptp(sub))
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        ref32 = dipy_mppca(sub.astype(den_input_dtype))
        t_dipy32 = time.perf_counter() - t
        t = time.perf_counter()
        ref64 = dipy_mppca(sub.astype(np.float64))
        t_dipy64 = time.perf_counter() - t
        t = time.perf_counter()
        ours32 = mppca(sub.astype(den_input_dtype), nprocs=1, suppress_warning=True)
        t_ours32 = time.perf_counter() - t
        t = time.perf_counter()
        ours64 = mppca(sub.astype(np.float64), nprocs=1, suppress_warning=True)
        t_ours64 = time.perf_counter() - t
    d32 = np.abs(ours32 - ref32) / rng
    out["mppca"] = {
        "block_shape": list(sub.shape),
        "data_range": rng,
        "float32_input_max_abs_diff_rel_range": float(d32.max()),
        "float32_input_p999_abs_diff_rel_range": float(np.quantile(d32, 0.999)),
        "float32_input_max_abs_diff": float(np.abs(ours32 - ref32).max()),
        "float64_input_max_abs_diff_rel_range": float(np.abs(ours64 - ref64).max() / rng),
        "float64_input_max_abs_diff": float(np.abs(ours64 - ref64).max()),
        "dipy_float32_vs_dipy_float64_max_abs_diff_rel_range": float(np.abs(ref32 - ref64).max() / rng),
        "single_thread_seconds": {"dipy_float32": t_dipy32, "ours_float32": t_ours32,
                                  "dipy_float64": t_dipy64, "ours_float64": t_ours64},
    }
    t = time.perf_counter()
    ref = gibbs_removal(gsub.copy(), slice_axis=2, num_processes=1, inplace=False)
    t_dipy = time.perf_counter() - t
    t = time.perf_counter()
    ours = unring(gsub, slice_axis=2, nprocs=1)                 # the pipeline's default (real FFTs)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    exact = unring(gsub, slice_axis=2, nprocs=1, exact=True)
    t_exact = time.perf_counter() - t
    grng = float(np.ptp(ref))
    out["gibbs"] = {"shape": list(gsub.shape), "data_range": grng, "max_abs_diff": float(np.abs(ours - ref).max()),
                    "max_abs_diff_rel_range": float(np.abs(ours - ref).max() / grng),
                    "median_abs_diff": float(np.median(np.abs(ours - ref))),
                    "bit_identical": bool(np.array_equal(ours, ref)),
                    "exact_mode_bit_identical": bool(np.array_equal(exact, ref)),
                    "single_thread_seconds": {"dipy": t_dipy, "ours": t_ours, "ours_exact": t_exact}}
    return out


# --- main ------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="hbn", choices=["demo", "hbn"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device for the MP-PCA eigen-decompositions")
    ap.add_argument("--work", default="/tmp/bids_adhd_bench_participant")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--reuse", action="store_true", help="reuse the simulated dataset in --work")
    ap.add_argument("--skip-motion", action="store_true", help="(debug) skip motion correction")
    ap.add_argument("--skip-masked-dwidenoise", action="store_true")
    return ap.parse_args(argv)


def prepare(args, cfg, result):
    """Simulate (or reuse) the dataset; load sub-01 as the pipeline does. Returns a dict of inputs."""
    import nibabel as nib

    work = Path(args.work)
    bids = work / "bids"
    if not (args.reuse and bids.is_dir()):
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        t = time.perf_counter()
        # in a process of its own, as a participant run never holds the simulator's memory: run in
        # this process, its freed heap stayed in this process's RSS and inflated every step's peak
        subprocess.run([sys.executable, "-m", "bids_adhd", "simulate", str(bids), "--subjects", "2", "--size",
                        args.size, "--seed", str(args.seed), "--nprocs", str(args.nprocs), "-q"], check=True, cwd=ROOT)
        result["simulate_wall_s"] = time.perf_counter() - t
    tmp = work / "run"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    dwi = bids / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"
    img = nib.load(str(dwi))
    raw = np.asarray(img.get_fdata(dtype=np.float32, caching="unchanged"))   # as the pipeline loads it
    bvals = np.loadtxt(str(dwi).replace(".nii.gz", ".bval"), ndmin=1)
    bvecs = np.loadtxt(str(dwi).replace(".nii.gz", ".bvec"), ndmin=2).T
    result["data"] = {"file": str(dwi.relative_to(work)), "shape": list(raw.shape), "dtype_on_disk":
                      str(img.get_data_dtype()), "voxel_mm": [float(z) for z in img.header.get_zooms()[:3]],
                      "bvals": sorted({int(b) for b in bvals}), "n_b0": int((bvals <= cfg.b0_threshold).sum())}
    print(f"data {raw.shape} {result['data']}", flush=True)
    cx, cy, cz = (s // 2 for s in raw.shape[:3])
    return {"bids": bids, "tmp": tmp, "dwi": dwi, "affine": img.affine, "raw": raw, "bvals": bvals,
            "phase_encoding": phase_encoding(bids),
            "bvecs": bvecs, "block": (slice(cx - 12, cx + 12), slice(cy - 12, cy + 12), slice(cz - 8, cz + 8)),
            "gibbs_vols": [0, 1, len(bvals) // 2, -1], "gibbs_slices": slice(cz - 2, cz + 2)}


def run_chains(args, cfg, d, ours, mr):
    """Our steps and MRtrix3's, each MRtrix3 step right after our matching one (both see about the same
    load). Arrays the pipeline would not hold any more are freed (the pipeline runs one step per process):
    what the agreement checks need later is kept as small crops or written to disk."""
    from scipy.ndimage import binary_dilation

    from bids_adhd.dmri.denoise import mppca
    from bids_adhd.dmri.dti import fit_dti
    from bids_adhd.dmri.gibbs import unring
    from bids_adhd.dmri.mask import brain_mask
    from bids_adhd.dmri.motion import correct_motion
    from bids_adhd.interfaces.dipy import _undenoised_reader, motion_eddy_axis

    n, tmp, affine, bvals, bvecs = args.nprocs, d["tmp"], d["affine"], d["bvals"], d["bvecs"]
    have_mr = shutil.which("dwidenoise") is not None
    nt = ["-nthreads", str(n), "-quiet", "-force"]
    fsl = (str(d["dwi"]).replace(".nii.gz", ".bvec"), str(d["dwi"]).replace(".nii.gz", ".bval"))
    raw = d.pop("raw")

    def premask():
        m, _ = brain_mask(raw, bvals, cfg.b0_threshold, cfg.mask_median_radius, cfg.mask_numpass, nprocs=n)
        return binary_dilation(m, iterations=cfg.denoise_patch_radius + 2)

    pm = timed("premask", premask, ours)
    pm_nii = save(pm, affine, tmp / "premask.nii.gz", np.uint8)
    den = timed("denoise", lambda: mppca(raw, mask=pm, patch_radius=cfg.denoise_patch_radius, nprocs=n,
                                         device=args.device, suppress_warning=True), ours)
    ours["denoise"].update(patches=mppca.last_stats["patches"], precision=mppca.last_stats["precision"],
                           premask_voxels=int(pm.sum()))
    d["raw_block"] = np.ascontiguousarray(raw[d["block"]])
    d["raw_nii"] = save(raw, affine, tmp / "raw.nii")   # the workflow's checked series (motion reads it)
    del raw
    if have_mr:
        run_cmd("dwidenoise", ["dwidenoise", str(d["dwi"]), str(tmp / "mr_den.mif")] + nt, mr)
        if not args.skip_masked_dwidenoise:
            run_cmd("dwidenoise_masked", ["dwidenoise", str(d["dwi"]), str(tmp / "mr_den_m.mif"), "-mask", pm_nii]
                    + nt, mr)
    unr = timed("unring", lambda: unring(den, slice_axis=cfg.gibbs_slice_axis, n_points=cfg.gibbs_n_points,
                                         nprocs=n), ours)
    d["den_gibbs"] = np.ascontiguousarray(den[:, :, d["gibbs_slices"]][..., d["gibbs_vols"]])
    del den
    if have_mr:
        run_cmd("mrdegibbs", ["mrdegibbs", str(tmp / "mr_den.mif"), str(tmp / "mr_deg.mif"), "-axes", "0,1"] + nt,
                mr)
    low = bvals <= cfg.dti_bmax
    d["unr_low"] = save(unr[..., low], affine, tmp / "unrung_low.nii")
    if args.skip_motion:
        eye = np.repeat(np.eye(4)[None], len(bvals), 0)
        mc = {"data": unr, "bvecs": bvecs, "motion_affines": eye, "affines": eye}
    else:   # as the workflow's MotionCorrect node calls it: the preset's settings, the eddy stage along
        # the sidecar's phase-encoding axis, moved volumes re-registered from the undenoised series
        kw = bench_motion.motion_kwargs(cfg, n, eddy_axis=motion_eddy_axis(cfg.motion_eddy, d["phase_encoding"]))
        reader = _undenoised_reader(SimpleNamespace(
            in_undenoised=d["raw_nii"], undenoised_gibbs=bool(cfg.gibbs), gibbs_slice_axis=cfg.gibbs_slice_axis,
            gibbs_n_points=cfg.gibbs_n_points)) if cfg.denoise != "none" else None
        mc = timed("motion", lambda: correct_motion(unr, affine, bvals, bvecs, undenoised=reader, **kw), ours)
        nv = len(bvals)
        ours["motion"].update(eddy_axis=kw["eddy_axis"], rounds=int(mc.get("rounds", 0)),
                              resampled=int(np.asarray(mc["resampled"]).sum()), volumes=nv,
                              wall_s_per_volume=ours["motion"]["wall_s"] / nv,
                              cpu_s_per_volume=ours["motion"]["cpu_s"] / nv)
        bvals = bvals[mc["kept"]]
    del unr
    mask, _ = timed("mask", lambda: brain_mask(mc["data"], bvals, cfg.b0_threshold, cfg.mask_median_radius,
                                                cfg.mask_numpass, nprocs=n), ours)
    d["mask"], d["mask_nii"] = mask, save(mask, affine, tmp / "mask.nii.gz", np.uint8)
    dti = timed("dti", lambda: fit_dti(mc["data"], bvals, mc["bvecs"], mask=mask, method=cfg.dti_fit,
                                       bmax=cfg.dti_bmax, b0_threshold=cfg.b0_threshold, nprocs=n), ours)
    d["fa"], d["motion_affines"], d["affines"] = dti["fa"], mc["motion_affines"], mc["affines"]
    del mc, dti
    if have_mr:
        shells = ",".join(str(int(b)) for b in sorted({int(round(b)) for b in bvals[low]}))
        run_cmd("dwiextract", ["dwiextract", str(tmp / "mr_deg.mif"), str(tmp / "mr_low.mif"), "-fslgrad", *fsl,
                               "-shells", shells] + nt, mr)
        run_cmd("dwi2tensor", ["dwi2tensor", str(tmp / "mr_low.mif"), str(tmp / "mr_dt.mif"), "-mask",
                               d["mask_nii"]] + nt, mr)
        run_cmd("tensor2metric", ["tensor2metric", str(tmp / "mr_dt.mif"), "-fa", str(tmp / "mr_fa.nii"),
                                  "-adc", str(tmp / "mr_md.nii"), "-mask", d["mask_nii"]] + nt, mr)
    return have_mr


STEP_PAIRS = {"denoise_vs_dwidenoise": ("denoise", "dwidenoise"),
              "denoise_vs_dwidenoise_masked": ("denoise", "dwidenoise_masked"),
              "unring_vs_mrdegibbs": ("unring", "mrdegibbs"),
              "dti_vs_dwiextract_dwi2tensor_tensor2metric": ("dti", ("dwiextract", "dwi2tensor", "tensor2metric"))}


def summarise_times(result, ours, mr):
    """Chain sums, whole-subject sums, peak memory and the ours/MRtrix3 ratios (wall and CPU)."""
    matched = ["premask", "denoise", "unring", "dti"]
    result["ours_steps"] = ours
    result["ours_matched_steps"] = matched
    result["ours_s"] = sum(ours[k]["wall_s"] for k in matched)
    result["ours_cpu_s"] = sum(ours[k]["cpu_s"] for k in matched)
    result["ours_total_s"] = sum(v["wall_s"] for v in ours.values())          # the whole subject, all steps
    result["ours_total_cpu_s"] = sum(v["cpu_s"] for v in ours.values())
    result["ours_total_steps"] = list(ours)
    result["ours_peak_rss_mb"] = max(v["peak_rss_mb"] for v in ours.values())
    result["ours_peak_rss_step"] = max(ours, key=lambda k: ours[k]["peak_rss_mb"])
    print(f"ours matched {result['ours_s']:.1f} s, total {result['ours_total_s']:.1f} s, peak "
          f"{result['ours_peak_rss_mb']:.0f} MB ({result['ours_peak_rss_step']})", flush=True)
    if not mr:
        result["mrtrix3_s"] = None
        result["ratio"] = None
        return
    chain = ["dwidenoise", "mrdegibbs", "dwiextract", "dwi2tensor", "tensor2metric"]
    result.update(mrtrix3_steps=mr, mrtrix3_chain=chain, mrtrix3_s=sum(mr[k]["wall_s"] for k in chain),
                  mrtrix3_cpu_s=sum(mr[k]["cpu_s"] for k in chain))
    result["ratio"] = result["ours_s"] / result["mrtrix3_s"]
    result["ratio_cpu"] = result["ours_cpu_s"] / result["mrtrix3_cpu_s"]
    if "dwidenoise_masked" in mr:
        ms = result["mrtrix3_s"] - mr["dwidenoise"]["wall_s"] + mr["dwidenoise_masked"]["wall_s"]
        mc_cpu = result["mrtrix3_cpu_s"] - mr["dwidenoise"]["cpu_s"] + mr["dwidenoise_masked"]["cpu_s"]
        result.update(mrtrix3_masked_s=ms, mrtrix3_masked_cpu_s=mc_cpu, ratio_vs_masked=result["ours_s"] / ms,
                      ratio_cpu_vs_masked=result["ours_cpu_s"] / mc_cpu)
    steps = {}
    for name, (a, b) in STEP_PAIRS.items():
        bs = b if isinstance(b, tuple) else (b,)
        if a in ours and all(k in mr for k in bs):
            w, c = sum(mr[k]["wall_s"] for k in bs), sum(mr[k]["cpu_s"] for k in bs)
            steps[name] = {"ratio": ours[a]["wall_s"] / w, "ratio_cpu": ours[a]["cpu_s"] / c}
    result["step_ratios"] = steps
    result["mrtrix3_peak_rss_mb"] = max(v["peak_rss_mb"] for v in mr.values())
    result["machine_load"] = {"ours_matched_steps": load_summary([ours[k] for k in matched]),
                              "mrtrix3_chain": load_summary([mr[k] for k in chain])}


def compare_fa(args, cfg, d, result):
    """FA agreement: identical input (our unrung data, b <= bmax, same mask) and the two chains."""
    from bids_adhd.dmri.dti import fit_dti

    tmp, mask, mask_nii, nt = d["tmp"], d["mask"], d["mask_nii"], ["-nthreads", str(args.nprocs), "-quiet", "-force"]
    low = d["bvals"] <= cfg.dti_bmax
    low_fsl = write_fsl(d["bvals"][low], d["bvecs"][low], str(tmp / "low"))
    agree, ext = {}, {}
    run_cmd("ols_fit", ["dwi2tensor", d["unr_low"], str(tmp / "ols_dt.mif"), "-fslgrad", *low_fsl, "-ols", "-iter",
                        "0", "-mask", mask_nii] + nt, ext)
    run_cmd("ols_fa", ["tensor2metric", str(tmp / "ols_dt.mif"), "-fa", str(tmp / "ols_fa.nii")] + nt, ext)
    run_cmd("wls_fit", ["dwi2tensor", d["unr_low"], str(tmp / "wls_dt.mif"), "-fslgrad", *low_fsl, "-mask",
                        mask_nii] + nt, ext)
    run_cmd("wls_fa", ["tensor2metric", str(tmp / "wls_dt.mif"), "-fa", str(tmp / "wls_fa.nii")] + nt, ext)
    unr_low = load(d["unr_low"])
    kw = dict(mask=mask, bmax=cfg.dti_bmax, nprocs=args.nprocs)
    dipy_ols = fit_dti(unr_low, d["bvals"][low], d["bvecs"][low], method="OLS", **kw)
    dipy_wls = fit_dti(unr_low, d["bvals"][low], d["bvecs"][low], method="WLS", **kw)["fa"]
    del unr_low
    mr_ols, mr_wls, mr_chain = (np.nan_to_num(load(tmp / f)) for f in ("ols_fa.nii", "wls_fa.nii", "mr_fa.nii"))
    agree["ols_identical_input"] = fa_agreement(dipy_ols["fa"], mr_ols, mask)
    # DIPY clips eigenvalues at its min_diffusivity (FA then in [0, 1]); MRtrix3 keeps negative
    # eigenvalues (FA can exceed 1): compare where DIPY's OLS tensor is positive definite
    pd = mask & (dipy_ols["evals"][..., 2] > 1e-8)
    agree["ols_identical_input_positive_definite"] = fa_agreement(dipy_ols["fa"], mr_ols, pd)
    agree["ols_identical_input_positive_definite"]["n_excluded_non_positive_definite"] = int(mask.sum() - pd.sum())
    agree["defaults_identical_input_dipy_wls_vs_mrtrix_iwls"] = fa_agreement(dipy_wls, mr_wls, mask)
    agree["chains_ours_vs_mrtrix3"] = fa_agreement(d["fa"], mr_chain, mask)
    truth = d["bids"] / "derivatives" / "truth" / "sub-01" / "dwi" / "sub-01_model-tensor_param-fa_dwimap.nii.gz"
    if truth.exists():
        tfa = load(truth)
        agree["ours_chain_vs_truth"] = fa_agreement(d["fa"], tfa, mask)
        agree["mrtrix3_chain_vs_truth"] = fa_agreement(mr_chain, tfa, mask)
        agree["ours_without_motion_correction_vs_truth"] = fa_agreement(dipy_wls, tfa, mask)
    result["fa_agreement"] = agree
    result["fa_comparison_commands"] = {k: v["command"] for k, v in ext.items()}
    head = agree["ols_identical_input_positive_definite"]           # headline: the exact comparison
    result.update(fa_corr=head["corr"], fa_max_abs_diff=head["max_abs_diff"],
                  fa_median_abs_diff=head["median_abs_diff"],
                  fa_headline_comparison="dwi2tensor -ols -iter 0 vs DIPY OLS, identical input (our unrung data, "
                  "b <= bmax), in the final mask where DIPY's tensor is positive definite; all mask voxels under "
                  "fa_agreement.ols_identical_input")


def phase_encoding(bids: Path) -> str | None:
    """sub-01's PhaseEncodingDirection with BIDS inheritance, as the workflow reads it."""
    from bids_adhd.bids import collect_runs

    return (collect_runs(bids, participant_label=["01"])[0].metadata or {}).get("PhaseEncodingDirection")


def motion_vs_truth(cfg, d):
    """Per-volume RMS displacement error over the truth brain (mm) of our reference -> volume maps
    against the simulator's, as benchmarks/motion.json measures it: the whole map (eddy o motion) and
    the rigid part alone (head motion). None without truth files."""
    t = d["bids"] / "derivatives" / "truth" / "sub-01" / "dwi"
    if not (t / "sub-01_desc-eddy_xfm.json").exists():
        return None
    truth = bench_motion.truth_of(d["bids"], "01")
    err = bench_motion.rms_errors(d["affines"], truth["A"], truth["brain"], d["affine"])
    rigid = bench_motion.rms_errors(d["motion_affines"], truth["M"], truth["brain"], d["affine"])
    eye = np.repeat(np.eye(4)[None], len(truth["M"]), 0)
    moved = bench_motion.rms_errors(truth["M"], eye, truth["brain"], d["affine"])
    m = moved > 0.01
    return {"n_volumes": int(len(err)), "n_moved": int(m.sum()), "true_max_rms_motion_mm": float(moved.max()),
            "rms_err_mm_max": float(err.max()), "rms_err_mm_median": float(np.median(err)),
            "rigid_rms_err_mm_max": float(rigid.max()), "rigid_rms_err_mm_median": float(np.median(rigid)),
            "moved_rigid_rms_err_mm_max": float(rigid[m].max()) if m.any() else None,
            "rms_err_mm": [round(float(e), 4) for e in err]}


def main(argv=None):
    args = parse_args(argv)
    from bids_adhd.config import PreprocConfig

    cfg = PreprocConfig()
    result = {"size": args.size, "seed": args.seed, "nprocs": args.nprocs, "device": args.device,
              "config": {k: getattr(cfg, k) for k in ("denoise_patch_radius", "gibbs_slice_axis", "gibbs_n_points",
                                                       "motion_level_iters", "motion_factors", "motion_sigmas",
                                                       "motion_rounds", "motion_eddy", "motion_sampling",
                                                       "motion_min_samples", "denoise", "gibbs",
                                                       "b0_threshold", "mask_median_radius", "mask_numpass",
                                                       "dti_fit", "dti_bmax")},
              "command": " ".join([".venv/bin/python", "benchmarks/participant.py"] + (argv or sys.argv[1:])),
              "machine": machine_info(), "code": code_info()}
    d = prepare(args, cfg, result)
    ours, mr = {}, {}
    have_mr = run_chains(args, cfg, d, ours, mr)
    summarise_times(result, ours, mr)
    if have_mr:
        compare_fa(args, cfg, d, result)
    if not args.skip_motion:
        mv = motion_vs_truth(cfg, d)
        if mv is not None:
            result["motion_vs_truth"] = mv
    result["dipy_agreement"] = dipy_checks(d["raw_block"], np.float32, d["den_gibbs"])
    result["dipy_agreement"]["mppca"]["block"] = [[s.start, s.stop] for s in d["block"]]
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    result["peak_rss_mb_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "participant" if args.size == "hbn" else f"participant_{args.size}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(json.dumps({k: result.get(k) for k in ("ours_s", "ours_total_s", "ours_peak_rss_mb", "mrtrix3_s",
                                                  "mrtrix3_masked_s", "ratio", "ratio_vs_masked", "ratio_cpu",
                                                  "step_ratios", "fa_corr", "fa_max_abs_diff")},
                     indent=1, default=float))
    return result


def _ld(rec):
    if "load_mean" not in rec:
        return ""
    oth = f" / {100 * rec['others_cpu_share']:.0f} %" if "others_cpu_share" in rec else ""
    return f"{rec['load_mean']:.1f}{oth}"


def _ratio_lines(r):
    L = []
    if r.get("mrtrix3_peak_rss_mb"):
        L += [f"* peak memory: ours {r['ours_peak_rss_mb']:.0f} MB in step {r.get('ours_peak_rss_step')} (this "
              "process; it keeps only small crops of earlier steps' arrays for the checks), MRtrix3 "
              f"{r['mrtrix3_peak_rss_mb']:.0f} MB (largest single command)"]
    for name, v in (r.get("step_ratios") or {}).items():
        L += [f"* step ratio {name}: wall {v['ratio']:.2f}, CPU {v['ratio_cpu']:.2f}"]
    return L


def markdown(r):
    o, m = r["ours_steps"], r.get("mrtrix3_steps", {})
    L = [f"# Participant-level benchmark ({r['size']}, {r['nprocs']} workers)", "",
         f"Command: `{r['command']}`  ", f"Data: {r['data']['shape']} ({r['data']['dtype_on_disk']}, "
         f"{[round(v, 3) for v in r['data']['voxel_mm']]} mm, b = {r['data']['bvals']})  ",
         f"Code: commit {(r.get('code') or {}).get('commit')}"
         f"{' + uncommitted changes' if (r.get('code') or {}).get('uncommitted_changes') else ''}  ",
         f"Machine: {r['machine']['cpu']}, {r['machine']['cpus_usable']} CPUs usable; load average "
         f"{r['machine']['load_avg_at_start'][0]:.1f} at start, {r['machine']['load_avg_at_end'][0]:.1f} at end "
         "(shared machine: compare CPU times too).", "",
         "Load = mean 1-min load average during the step; others = CPU time of the machine's other users "
         "during the step, as a share of all its CPUs (from /proc/stat).", "",
         "| step | ours wall s | ours CPU s | peak MB | load / others | | MRtrix3 step | wall s | CPU s | peak MB "
         "| load / others |",
         "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|"]
    pairs = [("premask", None), ("denoise", "dwidenoise"), ("unring", "mrdegibbs"), (None, "dwiextract"),
             ("dti", "dwi2tensor"), (None, "tensor2metric"), ("motion", None), ("mask", None),
             (None, "dwidenoise_masked")]
    for a, b in pairs:
        ra = o.get(a) if a else None
        rb = m.get(b) if b else None
        if ra is None and rb is None:
            continue
        fa = (f"{a} | {ra['wall_s']:.1f} | {ra['cpu_s']:.1f} | {ra['peak_rss_mb']:.0f} | {_ld(ra)}" if ra
              else " | | | |")
        fb = (f"{b} | {rb['wall_s']:.1f} | {rb['cpu_s']:.1f} | {rb['peak_rss_mb']:.0f} | {_ld(rb)}" if rb
              else " | | | |")
        L.append(f"| {fa} | | {fb} |")
    L += ["", f"* **matched steps** (premask + denoise + unring + tensor fit): ours **{r['ours_s']:.1f} s** wall "
          f"({r['ours_cpu_s']:.1f} s CPU)"]
    if r.get("mrtrix3_s"):
        L += [f"* MRtrix3 chain (dwidenoise whole volume, mrdegibbs, dwiextract, dwi2tensor, tensor2metric): "
              f"**{r['mrtrix3_s']:.1f} s** wall ({r['mrtrix3_cpu_s']:.1f} s CPU) -> ratio **{r['ratio']:.2f}** "
              f"(CPU {r['ratio_cpu']:.2f})"]
        if r.get("mrtrix3_masked_s"):
            L += [f"* MRtrix3 chain with dwidenoise -mask (our premask): {r['mrtrix3_masked_s']:.1f} s wall "
                  f"({r['mrtrix3_masked_cpu_s']:.1f} s CPU) -> ratio {r['ratio_vs_masked']:.2f} "
                  f"(CPU {r['ratio_cpu_vs_masked']:.2f})"]
    if r.get("machine_load"):
        lo, lm = r["machine_load"]["ours_matched_steps"], r["machine_load"]["mrtrix3_chain"]
        L += [f"* machine load during our matched steps: mean {lo['load_mean']:.1f} (others "
              f"{100 * lo.get('others_cpu_share', float('nan')):.0f} % of the CPUs); during the MRtrix3 chain: "
              f"mean {lm['load_mean']:.1f} (others {100 * lm.get('others_cpu_share', float('nan')):.0f} %)"]
    L += [f"* ours, whole subject (steps {', '.join(r.get('ours_total_steps', []))}): {r['ours_total_s']:.1f} s wall "
          f"({r['ours_total_cpu_s']:.1f} s CPU); peak RSS {r['ours_peak_rss_mb']:.0f} MB"]
    mo = o.get("motion") or {}
    if mo.get("volumes"):
        L += [f"* motion + eddy correction (default preset, up to {r['config']['motion_rounds']} rounds, "
              f"{mo['rounds']} run): {mo['wall_s_per_volume']:.2f} s wall / "
              f"{mo['cpu_s_per_volume']:.2f} s CPU per volume ({mo['volumes']} volumes, {mo['resampled']} resampled)"]
    L += _ratio_lines(r)
    if "fa_corr" in r:
        L += [f"* FA, `dwi2tensor -ols -iter 0` vs DIPY OLS on identical input (positive-definite voxels): corr "
              f"{r['fa_corr']:.9f}, median |dFA| {r['fa_median_abs_diff']:.2e}, max |dFA| "
              f"{r['fa_max_abs_diff']:.2e}"]
    if "fa_agreement" in r:
        L += ["", "| FA agreement (in mask) | corr | median abs diff | p99 | max abs diff | voxels > 1e-3 / all |",
              "|---|---:|---:|---:|---:|---:|"]
        for k, v in r["fa_agreement"].items():
            L.append(f"| {k} | {v['corr']:.6f} | {v['median_abs_diff']:.2e} | {v['p99_abs_diff']:.2e} | "
                     f"{v['max_abs_diff']:.2e} | {v['n_abs_diff_gt_1e-3']} / {v['n_voxels']} |")
    d = r["dipy_agreement"]
    L += ["", "| vs DIPY on the same input | value |", "|---|---|",
          f"| MP-PCA block {d['mppca']['block_shape']}, float32 input: max abs diff / range | "
          f"{d['mppca']['float32_input_max_abs_diff_rel_range']:.2e} (p99.9 "
          f"{d['mppca']['float32_input_p999_abs_diff_rel_range']:.2e}) |",
          f"| MP-PCA, float64 input: max abs diff / range | {d['mppca']['float64_input_max_abs_diff_rel_range']:.2e} |",
          f"| DIPY float32 vs DIPY float64 (same block): max abs diff / range | "
          f"{d['mppca']['dipy_float32_vs_dipy_float64_max_abs_diff_rel_range']:.2e} |",
          f"| Gibbs {d['gibbs']['shape']} (default, real FFTs): max abs diff | {d['gibbs']['max_abs_diff']:.3g} "
          f"({d['gibbs'].get('max_abs_diff_rel_range', float('nan')):.2e} of the range); exact=True bit identical: "
          f"{d['gibbs'].get('exact_mode_bit_identical')} |"]
    if "motion_vs_truth" in r:
        mv, mo = r["motion_vs_truth"], r["ours_steps"]["motion"]
        L += ["", f"Motion + eddy correction vs simulator truth ({mv['n_moved']} of {mv['n_volumes']} volumes moved, "
              f"up to {mv['true_max_rms_motion_mm']:.2f} mm RMS over the brain; eddy axis {mo.get('eddy_axis')}, "
              f"{mo.get('rounds')} rounds, {mo.get('resampled')} volumes resampled): per-volume RMS displacement "
              f"error over the brain max {mv['rms_err_mm_max']:.3f} mm (median {mv['rms_err_mm_median']:.3f}); "
              f"head motion (rigid part) max {mv['rigid_rms_err_mm_max']:.3f} mm (median "
              f"{mv['rigid_rms_err_mm_median']:.3f})."]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()

"""Faults during a participant run: SIGKILL at six points then resume, a full output disk,
two jobs sharing one OUTPUT_DIR, and (checked on every run here) no network access.

Every run is a real ``python -m bids_adhd`` process in its own session (process group),
so a kill takes the Nipype workers with it, as a scheduler's SIGKILL would. The data are
the session's simulated ``tiny_bids`` (2 subjects, demo grid) averaged 2×2×2 to 5 mm
voxels, and a light pipeline (``base: fast``, no denoising/unringing/motion, short
registration) so that one subject takes ~20 s on a loaded 2-core machine. The reference
run is uninterrupted; every other run must end byte-identical to it (the report's
"generated" time stamp aside).

Deterministic kill points (a mid-write kill cannot be timed from outside) are injected
with a ``sitecustomize`` placed on PYTHONPATH (``_HOOK``): it wraps ``shutil.copyfile``,
``gzip.GzipFile.write`` (the sink compresses work-dir images) and ``os.replace`` to SIGKILL the whole process group, or to fail with ENOSPC, when a
given derivative is written; it also installs an audit hook that logs (and blocks) every
name lookup or internet connection, for the no-network check.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import tree_hash, finish_process

LIGHT_PIPELINE = """\
base: fast
description: fault-injection tests - light and quick, not for results
preproc:
  denoise: none
  gibbs: false
  motion: false
  mask_median_radius: 1
  mask_numpass: 1
  dti_fit: OLS
template:
  affine_level_iters: [10]
  affine_factors: [4]
  affine_sigmas: [2.0]
"""

_HOOK = r'''
import errno, os, signal, sys

_netlog = os.environ.get("BIDS_ADHD_TEST_NETLOG")
if _netlog:
    _NET = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr",
            "socket.sendto", "urllib.Request", "http.client.connect"}

    def _audit(event, args):
        inet_connect = event == "socket.connect" and len(args) > 1 and isinstance(args[1], tuple)
        if event in _NET or inet_connect:
            with open(_netlog, "a") as fh:
                fh.write(f"{os.getpid()} {event} {args[1:] if event == 'socket.connect' else args!r}\n")
            raise OSError(errno.ENETUNREACH, "network access blocked by the test")

    sys.addaudithook(_audit)

_kill = os.environ.get("BIDS_ADHD_TEST_KILL", "")        # copy:<name part> | replace:<name part>
_enospc = os.environ.get("BIDS_ADHD_TEST_ENOSPC", "")    # <name part>
if _kill or _enospc:
    import shutil

    _copyfile, _replace = shutil.copyfile, os.replace

    def _die():
        os.killpg(os.getpgid(0), signal.SIGKILL)

    def copyfile(src, dst, *args, **kwargs):
        name = os.path.basename(os.fspath(dst))
        kill = _kill.startswith("copy:") and _kill[5:] in name
        if kill or (_enospc and _enospc in name):
            with open(src, "rb") as fi, open(dst, "wb") as fo:   # half the bytes, then die / disk full
                data = fi.read()
                fo.write(data[: len(data) // 2])
                fo.flush()
                os.fsync(fo.fileno())
            if kill:
                _die()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _copyfile(src, dst, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if _kill.startswith("replace:") and _kill[8:] in os.path.basename(os.fspath(dst)):
            _die()
        return _replace(src, dst, *args, **kwargs)

    shutil.copyfile, os.replace = copyfile, replace

    import gzip

    _gzwrite = gzip.GzipFile.write

    def gzwrite(self, data):
        # the sink publishes work-dir .nii files as .nii.gz through gzip (derivatives.write_nifti)
        name = os.path.basename(str(getattr(self.fileobj, "name", "") or ""))
        kill = _kill.startswith("copy:") and _kill[5:] in name
        if kill or (_enospc and _enospc in name):
            part = memoryview(data).cast("B")
            _gzwrite(self, part[: len(part) // 2])
            self.fileobj.flush()
            os.fsync(self.fileobj.fileno())
            if kill:
                _die()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _gzwrite(self, data)

    gzip.GzipFile.write = gzwrite
'''

_STAMP = re.compile(rb"generated \d{4}-\d\d-\d\d \d\d:\d\d UTC")


# --- data ------------------------------------------------------------------------------

def downsampled_copy(src: Path, dst: Path, factor: int = 2) -> Path:
    """Copy a BIDS dataset (without derivatives/), averaging each DWI over factor³ voxel blocks."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("derivatives"))
    for p in sorted(dst.rglob("*_dwi.nii.gz")):
        img = nib.load(str(p))
        data = np.asarray(img.dataobj, dtype=np.float32)
        (x, y, z), n = (s // factor for s in data.shape[:3]), data.shape[3]
        data = data[: x * factor, : y * factor, : z * factor]
        data = data.reshape(x, factor, y, factor, z, factor, n).mean(axis=(1, 3, 5))
        affine = img.affine.copy()
        affine[:3, 3] += img.affine[:3, :3] @ np.full(3, (factor - 1) / 2)
        affine[:3, :3] *= factor
        out = nib.Nifti1Image(np.round(data).astype(np.int16), affine)
        out.header.set_xyzt_units("mm", "sec")
        nib.save(out, str(p))
    return dst


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_bids):
    root = tmp_path_factory.mktemp("faults")
    bids = downsampled_copy(tiny_bids, root / "bids")
    (root / "light.yaml").write_text(LIGHT_PIPELINE)
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOOK)
    netlog = root / "network.log"
    return dict(root=root, bids=bids, pipeline=root / "light.yaml", hook=hook, netlog=netlog,
                before=tree_hash(bids))


def start(env, out, *extra, kill=None, enospc=None):
    """``python -m bids_adhd BIDS out participant`` in a new session, with the test hook."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BIDS_ADHD_TEST_")}
    environ.pop("NIPYPE_NO_ET", None)  # the app must switch etelemetry off itself
    environ["PYTHONPATH"] = os.pathsep.join([str(env["hook"])] + ([environ["PYTHONPATH"]]
                                                                  if environ.get("PYTHONPATH") else []))
    environ["BIDS_ADHD_TEST_NETLOG"] = str(env["netlog"])
    if kill:
        environ["BIDS_ADHD_TEST_KILL"] = kill
    if enospc:
        environ["BIDS_ADHD_TEST_ENOSPC"] = enospc
    cmd = [sys.executable, "-m", "bids_adhd", str(env["bids"]), str(out), "participant",
           "--skip-bids-validation", "--pipeline", str(env["pipeline"]), "--nprocs", "1", *map(str, extra)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=environ)


def finish(proc, timeout=300):
    return finish_process(proc, timeout, "run")


def kill_when(proc, path: Path, timeout=300) -> bool:
    """SIGKILL the run's process group as soon as ``path`` exists; False if it ended first."""
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            return False
        if time.monotonic() - t0 > timeout:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    return True


# --- output checks -----------------------------------------------------------------------

def final_files(out: Path) -> dict[str, Path]:
    """Every file under a final (non-hidden) name, outside the work dir and the per-run logs
    (``sub-<label>/log/<run-id>/``, named after each run)."""
    return {p.relative_to(out).as_posix(): p for p in out.rglob("*")
            if p.is_file() and ".bids_adhd_work" not in p.parts and not p.name.startswith(".")
            and p.relative_to(out).parts[1:2] != ("log",)}


def temp_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob(".*.tmp*")
                  if ".bids_adhd_work" not in p.parts)


def same_content(a: Path, b: Path) -> bool:
    if a.name.endswith(".html"):
        return _STAMP.sub(b"", a.read_bytes()) == _STAMP.sub(b"", b.read_bytes())
    return a.read_bytes() == b.read_bytes()


def assert_no_partial_outputs(out: Path, reference: Path):
    """Every file under a final name is complete: NIfTIs load, JSONs parse, and each equals the
    uninterrupted run's file."""
    for rel, p in final_files(out).items():
        if p.name.endswith(".nii.gz"):
            assert np.all(np.isfinite(nib.load(str(p)).get_fdata())), rel
        elif p.suffix == ".json":
            json.loads(p.read_text())
        ref = reference / rel
        assert ref.is_file(), f"unexpected output {rel}"
        assert same_content(p, ref), f"{rel} differs from the uninterrupted run's (partial?)"


def assert_same_outputs(out: Path, reference: Path, subjects=("01", "02")):
    want = {rel for rel in final_files(reference) if rel == "dataset_description.json"
            or any(rel.startswith(f"sub-{s}") for s in subjects)}
    have = set(final_files(out))
    assert have == want, (sorted(have - want), sorted(want - have))
    for rel in want:
        assert same_content(out / rel, reference / rel), rel
    for s in subjects:
        assert (out / f"sub-{s}" / "dwi" / f".sub-{s}_bids_adhd.done").is_file()
    assert temp_files(out) == []


# --- the uninterrupted reference: two jobs sharing OUTPUT_DIR ----------------------------------

@pytest.fixture(scope="module")
def reference(env):
    """Two participant jobs at once (the BIDS-Apps model: one job per subject), same OUTPUT_DIR and
    the same (default) work dir."""
    out = env["root"] / "reference"
    t0 = time.perf_counter()
    jobs = [start(env, out, "--participant-label", s) for s in ("01", "02")]
    results = [finish(j) for j in jobs]
    return dict(out=out, work=out / ".bids_adhd_work", results=results, seconds=time.perf_counter() - t0)


def test_two_jobs_share_output_dir(env, reference):
    for code, err in reference["results"]:
        assert code == 0, err[-3000:]
        assert "Traceback" not in err
    out = reference["out"]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "bids_adhd"
    assert temp_files(out) == []
    from bids_adhd import derivatives as dv

    for s in ("01", "02"):
        src = dv.Source(subject=s)
        for f in dv.participant_outputs(out, src):
            assert f.is_file(), f
        assert dv.report_html(out, s).is_file() and dv.done_stamp(out, src).is_file()
    assert tree_hash(env["bids"]) == env["before"]


# --- SIGKILL at six points, then resume ----------------------------------------------------

def test_kill_and_resume_participant(env, reference):
    out, work = env["root"] / "killed", env["root"] / "killed_work"
    wf = work / "bids_adhd_participant_wf"
    ref = reference["out"]
    args = ("--participant-label", "01", "--work-dir", work)
    # (what, how): a path whose appearance triggers the kill, or a hook that kills inside a write
    points = [
        ("workflow set-up", wf),
        ("tensor fit node", wf / "single_subject_01_wf" / "dwi_preproc_sub01" / "dti"),
        ("template registration node", wf / "single_subject_01_wf" / "template_sub01" / "register"),
        ("sink: mid-write of the FA map", "copy:param-fa_dwimap.nii.gz"),
        ("report written, not yet renamed", "replace:sub-01.html"),
        ("all outputs in place but the done stamp", "replace:_bids_adhd.done"),
    ]
    seen_temp = False
    for what, trigger in points:
        if isinstance(trigger, Path):
            proc = start(env, out, *args)
            assert kill_when(proc, trigger), f"run ended before the kill point '{what}'"
        else:
            code, err = finish(start(env, out, *args, kill=trigger))
            assert code == -signal.SIGKILL, f"kill point '{what}' not reached (exit {code}): {err[-2000:]}"
        assert_no_partial_outputs(out, ref)
        assert not (out / "sub-01" / "dwi" / ".sub-01_bids_adhd.done").exists(), what
        seen_temp |= bool(temp_files(out))
    assert seen_temp, "the mid-write kills should have left a hidden temporary file"
    # the resume may use other resources (here 2 processes, so 2 threads per node): the finished
    # nodes are reused all the same
    cached = {p: p.stat().st_mtime_ns for p in wf.rglob("result_*.pklz")
              if p.parent.name in ("check", "premask", "mask", "dti", "register")}
    assert len(cached) == 5, sorted(cached)
    code, err = finish(start(env, out, *args, "--nprocs", "2"))
    assert code == 0, err[-3000:]
    assert {p: p.stat().st_mtime_ns for p in cached} == cached, "finished nodes were recomputed"
    assert_same_outputs(out, ref, subjects=("01",))
    assert tree_hash(env["bids"]) == env["before"]


# --- a full output disk ----------------------------------------------------------------------

def _assert_disk_full_failure(code, err, out, ref):
    assert code == 73, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("bids_adhd: error:"), err[-3000:]
    assert "No space left on device" in lines[0] and "Traceback" not in err
    assert_no_partial_outputs(out, ref)
    assert temp_files(out) == []
    assert not (out / "sub-01" / "dwi" / ".sub-01_bids_adhd.done").exists()


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=755", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_then_space_freed(env, reference):
    """OUTPUT_DIR fills up while the sink copies the maps in: exit 73 with one line, no half file,
    no temporary left; after space is freed the re-run completes, identical to the reference.

    Where a tmpfs can be mounted (root), the disk is real: a tmpfs half the size of one subject's
    outputs, enlarged afterwards. Elsewhere ENOSPC is injected half-way through copying the MD map.
    The work dir's cached nodes are reused, so only the sink and the report run.
    """
    ref = reference["out"]
    need = sum(p.stat().st_size for rel, p in final_files(ref).items() if rel.startswith("sub-01"))
    mnt = env["root"] / "tmpfs"
    real = _mount_tmpfs(mnt, f"{need // 2 // 1024}k")
    out = (mnt if real else env["root"]) / "out_disk_full"
    args = ("--participant-label", "01", "--work-dir", reference["work"], "-q")
    try:
        code, err = finish(start(env, out, *args, enospc=None if real else "param-md_dwimap.nii.gz"))
        _assert_disk_full_failure(code, err, out, ref)
        if real:
            subprocess.run(["mount", "-o", f"remount,size={need * 3 // 1024}k", str(mnt)], check=True)
        code, err = finish(start(env, out, *args))
        assert code == 0, err[-3000:]
        assert_same_outputs(out, ref, subjects=("01",))
    finally:
        if real:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# --- no network, ever ----------------------------------------------------------------------------

def test_no_network_in_any_run(env, reference):
    """Every run of this module had name lookups and internet connections blocked and logged
    (audit hook in all processes, Nipype workers included), without NIPYPE_NO_ET set by us."""
    log = env["netlog"].read_text() if env["netlog"].exists() else ""
    assert log == "", log

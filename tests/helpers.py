"""Small hand-made BIDS datasets and checks shared by the tests."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np


def tensor_signal(shape=(10, 10, 8), n_dirs=12, n_b0=2, b=1000.0, seed=0, s0=1000.0):
    """A tiny DWI series with a known tensor field: (data, bvals, bvecs (N,3), affine)."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(n_dirs, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bvecs = np.vstack([np.zeros((n_b0, 3)), dirs])
    bvals = np.r_[np.zeros(n_b0), np.full(n_dirs, b)]
    evals = np.array([1.5e-3, 0.4e-3, 0.4e-3])
    D = np.diag(evals)
    sig = s0 * np.exp(-bvals * np.einsum("ni,ij,nj->n", bvecs, D, bvecs))
    data = np.broadcast_to(sig, shape + (len(bvals),)).astype(np.float32).copy()
    data += rng.normal(scale=5.0, size=data.shape).astype(np.float32)
    data = np.abs(data)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return data, bvals, bvecs, affine


def write_dwi(folder: Path, stem: str, data, bvals, bvecs, affine, metadata=None):
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(folder / f"{stem}.nii.gz"))
    np.savetxt(folder / f"{stem}.bval", np.asarray(bvals)[None], fmt="%g")
    np.savetxt(folder / f"{stem}.bvec", np.asarray(bvecs).T, fmt="%.6f")
    (folder / f"{stem}.json").write_text(json.dumps(metadata or {"PhaseEncodingDirection": "j-",
                                                                  "TotalReadoutTime": 0.05}))


def make_tiny_bids(root: Path, subjects=("01",), **kw) -> Path:
    """A minimal valid-looking BIDS dataset with one tiny DWI run per subject."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.10.0"}))
    lines = ["participant_id\tdiagnosis"]
    for k, sub in enumerate(subjects):
        data, bvals, bvecs, affine = tensor_signal(seed=k, **kw)
        write_dwi(root / f"sub-{sub}" / "dwi", f"sub-{sub}_dwi", data, bvals, bvecs, affine)
        lines.append(f"sub-{sub}\t{'ADHD' if k % 2 else 'TD'}")
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    return root


def tree_hash(root: Path) -> str:
    """Hash of every file's path, bytes and mode under root (the input must stay byte-identical)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            h.update(str(p.relative_to(root)).encode())
            h.update(oct(p.lstat().st_mode).encode())
            if p.is_file() and not p.is_symlink():
                h.update(p.read_bytes())
    return h.hexdigest()


def files_under(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def finish_process(proc, timeout=300, what="run"):
    """Wait for a ``start_new_session`` subprocess; on timeout kill its whole group and fail.
    Returns (exit code, stderr)."""
    import signal
    import subprocess

    import pytest

    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"{what} did not finish in {timeout} s:\n{err[-3000:]}")
    return proc.returncode, err


def validator_errors(dataset: Path, tmp_path: Path) -> list[str]:
    """``bids-validator-deno`` errors (``CODE location``) on ``dataset`` with an empty config
    (``-c`` pointing at ``{}``: nothing silenced); skips the test when the validator is missing."""
    import shutil
    import subprocess
    import sys

    import pytest

    exe = shutil.which("bids-validator-deno") or str(Path(sys.executable).with_name("bids-validator-deno"))
    if not Path(exe).exists():
        pytest.skip("bids-validator-deno is not installed (pip install bids-validator-deno)")
    config = tmp_path / "validator-config.json"
    config.write_text("{}")
    proc = subprocess.run([exe, "--json", "-c", str(config), str(dataset)], capture_output=True, text=True,
                          timeout=600)
    report = json.loads(proc.stdout)
    return [f"{i.get('code')} {i.get('location')}" for i in report["issues"]["issues"]
            if i.get("severity") == "error"]

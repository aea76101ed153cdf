"""Security: no network at run time, read-only input, untrusted files never unpickled or
executed, user-given names and paths cannot escape OUTPUT_DIR / the work dir, non-root image.

``test_whole_run_offline_readonly_oblique`` is the one real participant run here (in-process,
Linear plugin, so the socket patches reach every node): one subject with two runs, an oblique
series and a second one on another grid, under a path with spaces and non-ASCII letters, from a
read-only input (a read-only bind mount when root, else write permission removed).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_adhd import derivatives as dv
from bids_adhd.cli import main
from bids_adhd.errors import OutputError
from helpers import files_under, make_tiny_bids, tree_hash
from test_reliability_faults import LIGHT_PIPELINE, downsampled_copy

REPO = Path(__file__).resolve().parent.parent


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _oblique(affine, degrees=15.0):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    out = affine.copy()
    out[:3, :3] = rot @ affine[:3, :3]
    out[:3, 3] = rot @ affine[:3, 3]
    return out


def _ro_bind(src: Path, target: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    target.mkdir(parents=True)
    if subprocess.run(["mount", "--bind", str(src), str(target)], capture_output=True).returncode:
        return False
    if subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], capture_output=True).returncode:
        subprocess.run(["umount", str(target)], capture_output=True)
        return False
    return True


# --- the real run -----------------------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch):
    """Every way to reach the network raises; the calls are recorded."""
    calls = []

    def blocked(name):
        def _raise(*args, **kwargs):
            calls.append((name, args[:2]))
            raise OSError(f"network access blocked by the test ({name})")
        return _raise

    for name in ("create_connection", "getaddrinfo", "gethostbyname", "gethostbyname_ex"):
        monkeypatch.setattr(socket, name, blocked(name))

    class Socket(socket.socket):
        # Creating a socket is not network access (urllib3 probes IPv6 support at import by
        # binding ::1); connecting or sending anywhere is.
        connect, connect_ex, sendto = blocked("socket.connect"), blocked("socket.connect_ex"), blocked("sendto")

    monkeypatch.setattr(socket, "socket", Socket)
    # undo what earlier tests in this process may have done, so the app must switch etelemetry off itself
    from nipype.interfaces.base.core import BaseInterface

    monkeypatch.setattr(BaseInterface, "_etelemetry_version_data", None)
    monkeypatch.delenv("NIPYPE_NO_ET", raising=False)
    return calls


def test_whole_run_offline_readonly_oblique(tmp_path, tiny_bids, offline):
    base = tmp_path / "données ü"
    src = downsampled_copy(tiny_bids, base / "source")
    bids = base / "bids"
    folder = bids / "sub-01" / "dwi"
    folder.mkdir(parents=True)
    shutil.copy(src / "dataset_description.json", bids)
    (bids / "participants.tsv").write_text("participant_id\tdiagnosis\nsub-01\tTD\n")
    # run 1: sub-01's series with its affine tilted by 15°: an oblique acquisition
    img = nib.load(str(src / "sub-01" / "dwi" / "sub-01_dwi.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), _oblique(img.affine)), str(folder / "sub-01_run-1_dwi.nii.gz"))
    # run 2: another series on another grid (7.5 mm, other shape and origin)
    run2 = downsampled_copy(tiny_bids, base / "coarse", factor=3) / "sub-02" / "dwi"
    for ext in (".bval", ".bvec", ".json"):
        shutil.copy(src / "sub-01" / "dwi" / f"sub-01_dwi{ext}", folder / f"sub-01_run-1_dwi{ext}")
        shutil.copy(run2 / f"sub-02_dwi{ext}", folder / f"sub-01_run-2_dwi{ext}")
    shutil.copy(run2 / "sub-02_dwi.nii.gz", folder / "sub-01_run-2_dwi.nii.gz")
    pipeline = base / "light.yaml"
    pipeline.write_text(LIGHT_PIPELINE)
    before = tree_hash(bids)

    mount = base / "bids (read only)"
    mounted = _ro_bind(bids, mount)
    if not mounted:
        for p in [bids, *bids.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
    out = tmp_path / "sortie é" / "out"
    try:
        code = main([str(mount if mounted else bids), str(out), "participant", "--skip-bids-validation",
                     "--pipeline", str(pipeline), "--nipype-plugin", "Linear", "--work-dir",
                     str(tmp_path / "work"), "-q"])
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], capture_output=True)
        for p in [bids, *bids.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    assert code == 0
    assert offline == [], offline
    assert os.environ.get("NIPYPE_NO_ET") == "1"
    assert tree_hash(bids) == before
    for run, grid in (("1", img), ("2", nib.load(str(folder / "sub-01_run-2_dwi.nii.gz")))):
        s = dv.Source(subject="01", run=run)
        for f in dv.participant_outputs(out, s):
            assert f.is_file(), f
        fa = nib.load(str(dv.dwimap(out, s, "fa")))
        # processed in its own grid: same shape and (oblique) affine as the raw series
        assert fa.shape == grid.shape[:3]
        assert np.allclose(fa.affine, grid.affine if run == "2" else _oblique(img.affine), atol=1e-4)
        assert np.isfinite(fa.get_fdata()).all() and fa.get_fdata().max() > 0.3
        std = nib.load(str(dv.dwimap(out, s, "fa", space=dv.TEMPLATE_SPACE)))
        assert std.shape == (32, 32, 32)
        qc = json.loads(dv.qc_json(out, s).read_text())
        assert qc["registration_similarity"] > 0.5, qc["registration_similarity"]
    assert dv.report_html(out, "01").is_file()


# --- untrusted files ---------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.mark.parametrize("kind", ["pickle", "torch-zip"])
def test_model_adapter_pickle_is_refused_unopened(tmp_path, capsys, kind):
    bids = make_tiny_bids(tmp_path / "bids")
    marker = tmp_path / "PWNED"
    model = tmp_path / "adapter.safetensors"
    if kind == "pickle":
        model.write_bytes(pickle.dumps(_Payload(marker)))
    else:  # what torch.save writes: a zip holding a pickle
        import torch

        torch.save({"x": _Payload(marker)}, str(model))
    before = tree_hash(bids)
    code = main([str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation", "--model", str(model)])
    err = capsys.readouterr().err
    assert code == 65, err
    assert "adapter.safetensors" in err and "not a safetensors file" in err and "Traceback" not in err
    assert not marker.exists(), "the pickle was executed"
    assert files_under(tmp_path / "out") == [] and tree_hash(bids) == before


def test_pipeline_yaml_cannot_run_code(tmp_path, capsys):
    bids = make_tiny_bids(tmp_path / "bids")
    marker = tmp_path / "PWNED"
    yml = tmp_path / "evil.yaml"
    yml.write_text(f"preproc: !!python/object/apply:os.system [\"touch '{marker}'\"]\n")
    code = main([str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation", "--pipeline", str(yml)])
    err = capsys.readouterr().err
    assert code == 64 and "evil.yaml is not valid YAML" in err and "Traceback" not in err
    assert not marker.exists()


# --- names and paths cannot escape -------------------------------------------------------------------

def test_filter_values_with_path_characters(tmp_path, capsys):
    bids = make_tiny_bids(tmp_path / "bids")
    flt = tmp_path / "filter.json"
    flt.write_text(json.dumps({"dwi": {"subject": "../../evil", "acquisition": "/tmp/evil",
                                       "run": "1/../../x", "session": ".*"}}))
    before, listing = tree_hash(bids), _listing(tmp_path)
    code = main([str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                 "--bids-filter-file", str(flt)])
    err = capsys.readouterr().err
    assert code == 18 and "no DWI series selected" in err and "Traceback" not in err
    assert _listing(tmp_path) == listing and tree_hash(bids) == before
    assert not Path("/tmp/evil").exists()


@pytest.mark.parametrize("value", ["../x", "a/b", "..", "x\x00y", "01 ", ""])
def test_entity_values_cannot_make_paths(tmp_path, value):
    entities = {"subject": value} if value else {"subject": "01", "run": value}
    with pytest.raises(OutputError):
        dv.Source(**entities)
    s = dv.Source(subject="01", session="a", acquisition="b", direction="AP", run="1")
    for f in dv.participant_outputs(tmp_path, s):
        assert f.resolve().is_relative_to(tmp_path) and ".." not in f.parts


def test_output_or_work_dir_reaching_into_bids_dir(tmp_path, capsys):
    bids = make_tiny_bids(tmp_path / "bids")
    before = tree_hash(bids)
    link = tmp_path / "out_link"
    link.symlink_to(bids / "sub-01")
    wlink = tmp_path / "work_link"
    wlink.symlink_to(bids)
    for argv in ([str(link), "participant"],
                 [str(tmp_path / "out"), "participant", "--work-dir", str(bids / "work")],
                 [str(tmp_path / "out"), "participant", "--work-dir", str(wlink / "w")]):
        code = main([str(bids), *argv, "--skip-bids-validation"])
        err = capsys.readouterr().err
        assert code == 64 and "inside BIDS_DIR" in err and "Traceback" not in err, err
    assert tree_hash(bids) == before and not (tmp_path / "out").exists()


def test_symlink_at_an_output_name_is_replaced_not_followed(tmp_path):
    """A link planted at a final output name (pointing into the raw data) is replaced by the
    new file; its target is never written."""
    victim = tmp_path / "bids" / "sub-01_dwi.json"
    victim.parent.mkdir()
    victim.write_text('{"raw": true}')
    src = dv.Source(subject="01")
    out = tmp_path / "out"
    for final, write in ((dv.qc_json(out, src), lambda p: dv.write_json(p, {"new": 1})),
                         (dv.brain_mask(out, src), lambda p: dv.copy_file(victim, p))):
        final.parent.mkdir(parents=True, exist_ok=True)
        final.symlink_to(victim)
        write(final)
        assert not final.is_symlink()
    assert victim.read_text() == '{"raw": true}'


def test_output_dir_on_a_read_only_file_system(tmp_path, capsys):
    bids = make_tiny_bids(tmp_path / "bids")
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _ro_bind(ro, tmp_path / "ro_mount"):
        pytest.skip("cannot bind-mount read-only here (needs root)")
    try:
        code = main([str(bids), str(tmp_path / "ro_mount" / "out"), "participant", "--skip-bids-validation"])
    finally:
        subprocess.run(["umount", str(tmp_path / "ro_mount")], capture_output=True)
    err = capsys.readouterr().err
    assert code == 73 and "not writable" in err and "Traceback" not in err, err


def test_atomic_write_on_a_read_only_file_system(tmp_path, monkeypatch):
    import errno
    import tempfile

    def erofs(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", erofs)
    with pytest.raises(OutputError, match="cannot write .*x.json: Read-only file system"):
        dv.write_json(tmp_path / "x.json", {})
    assert files_under(tmp_path) == []


# --- the image ----------------------------------------------------------------------------------------

def test_image_runs_as_non_root():
    dockerfile = REPO / "Dockerfile"
    if not dockerfile.is_file():
        pytest.skip("no Dockerfile in this checkout")
    users = [ln.split(None, 1)[1].strip() for ln in dockerfile.read_text().splitlines()
             if ln.strip().upper().startswith("USER ")]
    assert users, "the Dockerfile declares no USER: the app would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"the image's final USER is {users[-1]}"

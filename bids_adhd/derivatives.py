"""The one module that knows derivative file names, and writes them atomically.

Layout of OUTPUT_DIR (a BIDS-Derivatives dataset, the BIDS-Apps convention)::

    dataset_description.json
    sub-<label>.html                                       per-subject QC report
    sub-<label>/[ses-<label>/]dwi/
        <src>_desc-preproc_dwi.nii.gz | .bval | .bvec | .json
        <src>_desc-brain_mask.nii.gz
        <src>_desc-confounds_timeseries.tsv | .json
        <src>_model-tensor_param-{fa,md,ad,rd,tensor}_dwimap.nii.gz | .json
        <src>_space-MNI152NLin2009aSym_model-tensor_param-{fa,md}_dwimap.nii.gz
        <src>_space-MNI152NLin2009aSym_desc-brain_mask.nii.gz
        <src>_from-dwi_to-MNI152NLin2009aSym_mode-image_xfm.txt
        <src>_desc-qc_dwi.json
        <src>_desc-adhd_prediction.json                    with --model
    group/                                                 group level

``<src>`` is ``sub-X[_ses-Y][_acq-A][_dir-D][_run-N]`` taken from the raw DWI
file. Native-space files carry no ``space`` entity (they are in the space of
the raw DWI, which BIDS expresses by omitting it).

Every write goes to a hidden temporary file in the destination folder and is
renamed into place, so a killed run never leaves a half-written file under a
final name.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

from . import __version__
# Entity knowledge lives in ``entities``; re-exported here for the readers of output names.
from .entities import SOURCE_ENTITIES, TEMPLATE_SPACE, Source  # noqa: F401
from .errors import OutputError

# BIDS entity order for the derivative entities we add.
_DERIV_ORDER = ("from", "to", "mode", "space", "model", "param", "desc")


def name(src: Source, suffix: str, ext: str, **entities) -> str:
    """``<src>[_from-..][_to-..][_mode-..][_space-..][_model-..][_param-..][_desc-..]_<suffix><ext>``."""
    unknown = set(entities) - set(_DERIV_ORDER)
    if unknown:
        raise ValueError(f"unknown derivative entities {unknown}")
    parts = [src.prefix] + [f"{k}-{entities[k]}" for k in _DERIV_ORDER if entities.get(k)]
    return "_".join(parts) + f"_{suffix}{ext}"


def path(root: os.PathLike, src: Source, suffix: str, ext: str, **entities) -> Path:
    return src.folder(root) / name(src, suffix, ext, **entities)


# --- the named outputs -------------------------------------------------------

DTI_PARAMS = ("fa", "md", "ad", "rd")
TEMPLATE_PARAMS = ("fa", "md")


def preproc_dwi(root, src, ext=".nii.gz"):
    return path(root, src, "dwi", ext, desc="preproc")


def brain_mask(root, src, space=None):
    return path(root, src, "mask", ".nii.gz", space=space, desc="brain")


def confounds(root, src, ext=".tsv"):
    return path(root, src, "timeseries", ext, desc="confounds")


def dwimap(root, src, param, space=None, ext=".nii.gz"):
    return path(root, src, "dwimap", ext, space=space, model="tensor", param=param)


def xfm(root, src, to=TEMPLATE_SPACE):
    return path(root, src, "xfm", ".txt", **{"from": "dwi", "to": to, "mode": "image"})


def qc_json(root, src):
    return path(root, src, "dwi", ".json", desc="qc")


def prediction_json(root, src):
    return path(root, src, "prediction", ".json", desc="adhd")


def report_html(root, subject: str) -> Path:
    return Path(root) / f"sub-{subject}.html"


def done_stamp(root, src) -> Path:
    """Written last: its presence means every output of this run is in place."""
    return src.folder(root) / f".{src.prefix}_bids_adhd.done"


def log_dir(root, subject: str, run_id: str) -> Path:
    """``sub-<label>/log/<run-id>/``: one participant run's crash files and resolved pipeline (fMRIPrep's layout)."""
    return Path(root) / f"sub-{subject}" / "log" / run_id


def pipeline_yaml(root, subject: str, run_id: str) -> Path:
    """The resolved pipeline configuration a participant run used, next to its crash files."""
    return log_dir(root, subject, run_id) / "pipeline.yaml"


def crash_files(folder: os.PathLike) -> list[Path]:
    """Nipype's text crash files in ``folder`` (a log dir, or the work dir's ``crash/``), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("crash-*.txt") if p.is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def read_crash(crash_file: os.PathLike) -> dict:
    """``{"node", "error", "file"}`` of a Nipype text crash file: the failed node's name and its last
    error line (``bids_adhd.errors.DataError: ...`` for a user error raised inside a node)."""
    crash_file = Path(crash_file)
    lines = [ln.strip() for ln in crash_file.read_text(errors="replace").splitlines() if ln.strip()]
    node = lines[0].split(":", 1)[1].strip().split(".", 1)[-1] if lines and lines[0].startswith("Node:") else "?"
    error = next((ln for ln in reversed(lines) if "Error:" in ln or "Exception:" in ln),
                 lines[-1] if lines else "unknown error")
    return {"node": node, "error": error, "file": str(crash_file)}


def group_dir(root) -> Path:
    return Path(root) / "group"


def saliency_map(folder) -> Path:
    """A saliency map on the template grid, in ``group/`` or a ``group/fold-K/`` folder (+ .json sidecar)."""
    return Path(folder) / f"space-{TEMPLATE_SPACE}_desc-saliency_stat.nii.gz"


def participant_outputs(root, src, with_template: bool = True) -> list[Path]:
    """Every file the participant level writes for one run (the completeness check)."""
    out = [preproc_dwi(root, src), preproc_dwi(root, src, ".bval"), preproc_dwi(root, src, ".bvec"),
           preproc_dwi(root, src, ".json"), brain_mask(root, src),
           confounds(root, src), confounds(root, src, ".json")]
    for p in DTI_PARAMS + ("tensor",):
        out += [dwimap(root, src, p), dwimap(root, src, p, ext=".json")]
    if with_template:
        for p in TEMPLATE_PARAMS:
            out += [dwimap(root, src, p, space=TEMPLATE_SPACE),
                    dwimap(root, src, p, space=TEMPLATE_SPACE, ext=".json")]
        out += [brain_mask(root, src, space=TEMPLATE_SPACE), xfm(root, src), qc_json(root, src)]
    return out


# --- atomic writing ----------------------------------------------------------

@contextlib.contextmanager
def atomic_path(final: os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place on success.

    The temporary name keeps the full extension (``.nii.gz``) so that writers
    that choose the format from the name behave the same.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {final.parent}: {exc.strerror}") from None
    ext = "".join(final.suffixes[-2:]) if final.name.endswith(".nii.gz") else final.suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{ext}", dir=final.parent)
    except OSError as exc:  # read-only file system, no space for the inode, ...
        raise OutputError(f"cannot write {final}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp makes 0600 files; give the usual umask-based mode so other users
        # (e.g. a container running as another uid) can read the outputs.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {final}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_TEMP = re.compile(r"^\.(?P<final>.+)\.[a-z0-9_]{8}\.tmp")


def remove_stale_temps(root: os.PathLike, sources, min_age_s: float = 60.0) -> list[Path]:
    """Delete the hidden temporary files a killed run left beside the outputs of ``sources``.

    Only temporaries of this module's writes (``.<final name>.<random>.tmp*``) whose final name
    belongs to one of ``sources`` (or to its subject's report) are touched: another job may be
    writing other subjects into the same OUTPUT_DIR. ``dataset_description.json``, which every
    job writes, and ``.bidsignore`` lose only temporaries older than ``min_age_s``.
    """
    import time

    root = Path(root)
    removed = []
    by_folder: dict[Path, set[str]] = {}
    for src in sources:
        names = [p for p in participant_outputs(root, src) if p.parent == src.folder(root)]
        names += [done_stamp(root, src), prediction_json(root, src)]
        by_folder.setdefault(src.folder(root), set()).update(p.name for p in names)
        by_folder.setdefault(root, set()).add(report_html(root, src.subject).name)
    for folder, finals in by_folder.items():
        if not folder.is_dir():
            continue
        for tmp in folder.glob(".*.tmp*"):
            m = _TEMP.match(tmp.name)
            if m and m.group("final") in finals and tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    now = time.time()
    shared = [*root.glob(".dataset_description.json.*.tmp*"), *root.glob("..bidsignore.*.tmp*")]
    for tmp in shared:
        try:
            if _TEMP.match(tmp.name) and now - tmp.stat().st_mtime > min_age_s:
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
        except OSError:
            pass
    return removed


def remove_temps_under(folder: os.PathLike) -> list[Path]:
    """Delete every temporary of this module's writes (``.<final name>.<random>.tmp*``) below
    ``folder``: for a folder that one job owns alone (the group level's ``group/``)."""
    removed = []
    for tmp in sorted(Path(folder).rglob(".*.tmp*")):
        if _TEMP.match(tmp.name) and tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(final: os.PathLike, text: str) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(final)


def write_bytes(final: os.PathLike, data: bytes) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def write_json(final: os.PathLike, obj) -> Path:
    return write_text(final, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


#: gzip level of the ``.nii.gz`` derivatives: level 1 costs a fraction of the CPU of nibabel's default
#: 6 for somewhat larger files (measured on a demo DWI: ``benchmarks/results/code_timings.md``)
NIFTI_GZIP_LEVEL = 1


#: NIfTI xform code of an image in a standard template space (fMRIPrep/niworkflows: 4, "mni"),
#: instead of 1 ("scanner") for images in the space of the raw data
STANDARD_XFORM_CODE = 4


def xform_code(final: os.PathLike) -> int | None:
    """The sform/qform code an output must carry by its name: 4 in a standard space, else None (kept)."""
    return STANDARD_XFORM_CODE if f"_space-{TEMPLATE_SPACE}_" in Path(final).name else None


def write_nifti(final: os.PathLike, img) -> Path:
    """Write ``img`` atomically; ``.nii.gz`` gets a fast gzip level and no timestamp (reproducible bytes).

    An output in ``TEMPLATE_SPACE`` (by its name) gets sform and qform code 4 (standard space).
    """
    import gzip

    import nibabel as nib

    code = xform_code(final)
    if code is not None:
        img.set_sform(img.affine, code=code)
        img.set_qform(img.affine, code=code)
    with atomic_path(final) as tmp:
        if Path(final).name.endswith(".gz"):
            with open(tmp, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh,
                                                      compresslevel=NIFTI_GZIP_LEVEL, mtime=0) as gz:
                img.to_file_map(img.make_file_map({"image": gz, "header": gz}))
        else:
            nib.save(img, str(tmp))
    return Path(final)


def copy_nifti(src_file: os.PathLike, final: os.PathLike) -> Path:
    """Copy a NIfTI file under its final name, (de)compressing when the two names differ in ``.gz``."""
    import nibabel as nib

    if str(src_file).endswith(".gz") == str(final).endswith(".gz") and xform_code(final) is None:
        return copy_file(src_file, final)
    return write_nifti(final, nib.load(str(src_file)))


def copy_file(src_file: os.PathLike, final: os.PathLike) -> Path:
    import shutil

    with atomic_path(final) as tmp:
        shutil.copyfile(src_file, tmp)
    return Path(final)


def write_tsv(final: os.PathLike, columns: Mapping[str, list], float_fmt: str = "{:.6g}") -> Path:
    keys = list(columns)
    n = len(columns[keys[0]]) if keys else 0
    lines = ["\t".join(keys)]
    for i in range(n):
        row = []
        for k in keys:
            v = columns[k][i]
            if v is None or (isinstance(v, float) and v != v):
                row.append("n/a")
            elif isinstance(v, float):
                row.append(float_fmt.format(v))
            else:
                row.append(str(v))
        lines.append("\t".join(row))
    return write_text(final, "\n".join(lines) + "\n")


def _jsonable(obj):
    import numpy as np

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path,)):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dataset_description(container: dict | None = None) -> dict:
    generated = {"Name": "bids_adhd", "Version": __version__,
                 "CodeURL": "https://github.com/bids-adhd/bids_adhd"}
    if container:
        generated["Container"] = container
    return {"Name": "bids_adhd derivatives: preprocessed diffusion MRI, DTI maps and ADHD classification",
            "BIDSVersion": "1.10.0", "DatasetType": "derivative", "GeneratedBy": [generated]}


def container_info() -> dict | None:
    """What the app runs in, from variables the Docker/Apptainer images set."""
    if os.environ.get("BIDS_ADHD_CONTAINER"):
        return {"Type": os.environ["BIDS_ADHD_CONTAINER"],
                "Tag": os.environ.get("BIDS_ADHD_IMAGE", "unknown")}
    if os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"):
        return {"Type": "apptainer",
                "Tag": os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER")}
    return None


#: what the BIDS schema has no name for, kept out of validation by OUTPUT_DIR/.bidsignore (fMRIPrep and
#: QSIRecon ignore their ``*_xfm.*`` and ``*_timeseries.tsv`` the same way); the rest (preprocessed DWI
#: and its sidecar, brain masks, dataset_description.json) validates with ``bids-validator-deno``
#: (docs/outputs.md says which is which).
BIDSIGNORE = (
    "sub-*.html",                   # per-subject HTML reports (the BIDS-Apps place for them)
    "sub-*/log",                    # per-subject logs: crash files and the resolved pipeline YAML
    "/group",                       # the group level's results (no BIDS name for a classifier's outputs)
    "*_desc-qc_dwi.json",           # the QC numbers of a run: a report in JSON, not a sidecar of an image
    "*_desc-preproc_dwi.bval",      # the b-table of the preprocessed DWI: BIDS names .bval/.bvec only for raw
    "*_desc-preproc_dwi.bvec",      # DWI (no desc/space entity allowed), with or without a space- entity
    "*_dwimap.*",                   # DTI maps: BEP016 names (model-/param- entities), not yet in the schema
    "*_timeseries.*",               # motion confounds of a DWI run: the schema has no dwi timeseries
    "*_xfm.*",                      # transforms: not in the schema (fMRIPrep ignores them too)
)


def ensure_bidsignore(root: os.PathLike) -> Path:
    """Write ``OUTPUT_DIR/.bidsignore`` with ``BIDSIGNORE``, keeping any lines a user added."""
    final = Path(root) / ".bidsignore"
    try:
        lines = final.read_text(encoding="utf-8").splitlines() if final.is_file() else []
    except (OSError, UnicodeDecodeError):
        lines = []
    missing = [p for p in BIDSIGNORE if p not in lines]
    if not missing:
        return final
    return write_text(final, "\n".join(lines + missing) + "\n")


def ensure_dataset_description(root: os.PathLike, source_dataset: os.PathLike | None = None) -> Path:
    """Write ``dataset_description.json`` unless a valid one is there.

    Safe when several participant jobs share OUTPUT_DIR: each writes a complete
    file to a temporary name and renames it, so readers never see a partial file.
    """
    final = Path(root) / "dataset_description.json"
    if final.is_file():
        try:
            if json.loads(final.read_text()).get("DatasetType") == "derivative":
                return final
        except (ValueError, OSError):
            pass
    desc = dataset_description(container_info())
    if source_dataset is not None:
        desc["SourceDatasets"] = [{"URL": Path(source_dataset).resolve().as_uri()}]
    return write_json(final, desc)

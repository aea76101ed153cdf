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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from . import __version__
from .errors import OutputError

TEMPLATE_SPACE = "MNI152NLin2009aSym"
SOURCE_ENTITIES = ("subject", "session", "acquisition", "direction", "run")
_KEYS = {"subject": "sub", "session": "ses", "acquisition": "acq",
         "direction": "dir", "run": "run"}
# BIDS entity order for the derivative entities we add.
_DERIV_ORDER = ("from", "to", "mode", "space", "model", "param", "desc")
_LABEL = re.compile(r"^[A-Za-z0-9]+$")


@dataclass(frozen=True)
class Source:
    """The entities of one raw DWI run that every derivative name starts with."""

    subject: str
    session: str | None = None
    acquisition: str | None = None
    direction: str | None = None
    run: str | None = None

    def __post_init__(self):
        for key in SOURCE_ENTITIES:
            value = getattr(self, key)
            if value is not None and not _LABEL.match(str(value)):
                raise OutputError(f"entity {key}={value!r} is not a BIDS label (letters and digits only)")

    @classmethod
    def from_entities(cls, entities: Mapping) -> "Source":
        return cls(**{k: (str(entities[k]) if entities.get(k) is not None else None)
                      for k in SOURCE_ENTITIES})

    @property
    def prefix(self) -> str:
        return "_".join(f"{_KEYS[k]}-{getattr(self, k)}" for k in SOURCE_ENTITIES
                        if getattr(self, k) is not None)

    @property
    def key(self) -> str:
        """A short unique id for this run (node names, logs)."""
        return self.prefix.replace("-", "").replace("_", "-")

    def folder(self, root: os.PathLike) -> Path:
        path = Path(root) / f"sub-{self.subject}"
        if self.session:
            path = path / f"ses-{self.session}"
        return path / "dwi"


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


def report_figures_dir(root, subject: str) -> Path:
    """Figures are embedded in the HTML; this folder is only for debugging copies."""
    return Path(root) / f"sub-{subject}" / "figures"


def done_stamp(root, src) -> Path:
    """Written last: its presence means every output of this run is in place."""
    return src.folder(root) / f".{src.prefix}_bids_adhd.done"


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
    job writes, loses only temporaries older than ``min_age_s``.
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
    for tmp in root.glob(".dataset_description.json.*.tmp*"):
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


#: gzip level of the ``.nii.gz`` derivatives: on a demo DWI (41 MB of float32) level 1 takes 1.1 s
#: against 3.6 s for nibabel's default 6, for 6 % more bytes
NIFTI_GZIP_LEVEL = 1


def write_nifti(final: os.PathLike, img) -> Path:
    """Write ``img`` atomically; ``.nii.gz`` gets a fast gzip level and no timestamp (reproducible bytes)."""
    import gzip

    import nibabel as nib

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

    if str(src_file).endswith(".gz") == str(final).endswith(".gz"):
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

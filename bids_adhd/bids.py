"""Input side: the BIDS dataset, subject/session selection, labels, and the checks
that turn a bad dataset into a one-line error before any work starts.

Nothing here writes: the input dataset is read only.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .entities import KEY_ENTITIES, LABEL as _LABEL, Source
from .errors import (DataError, MissingInputError, NothingSelectedError, OutputError,
                     UsageError, ValidationError)

LOG = logging.getLogger("bids_adhd.bids")
# A header that asks for more than this many voxels×volumes is refused before
# anything is allocated (a 256³ × 300-volume float32 series is ~20 GB).
MAX_ELEMENTS = 2 ** 32


@dataclass(frozen=True)
class DwiRun:
    """One raw DWI series and its sidecars."""

    source: Source
    dwi: Path
    bval: Path
    bvec: Path
    sidecar: Path | None = None
    metadata: dict = field(default_factory=dict, compare=False, hash=False)


# --- paths and labels ------------------------------------------------------

def clean_labels(labels, prefix: str) -> list[str] | None:
    """``['sub-01', '02']`` → ``['01', '02']``; anything but letters and digits is refused."""
    if not labels:
        return None
    out = []
    for raw in labels:
        label = raw[len(prefix) + 1:] if raw.startswith(prefix + "-") else raw
        if not _LABEL.match(label):
            raise UsageError(f"{prefix} label {raw!r} is not a BIDS label: use letters and digits only "
                             f"(e.g. {prefix}-01 or 01)")
        out.append(label)
    return sorted(set(out))


def check_bids_dir(bids_dir) -> Path:
    path = Path(bids_dir)
    if not path.exists():
        raise MissingInputError(f"BIDS_DIR {bids_dir} does not exist")
    if not path.is_dir():
        raise UsageError(f"BIDS_DIR {bids_dir} is not a directory")
    desc = path / "dataset_description.json"
    if not desc.is_file():
        raise ValidationError(f"{bids_dir} is not a BIDS dataset: {desc.name} is missing "
                              "(point BIDS_DIR at the dataset root)")
    try:
        content = json.loads(desc.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationError(f"{desc} is not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(content, dict) or not content.get("Name") or not content.get("BIDSVersion"):
        raise ValidationError(f"{desc} must hold 'Name' and 'BIDSVersion'")
    return path.resolve()


def check_output_dir(output_dir, bids_dir: Path) -> Path:
    """OUTPUT_DIR must not be the raw dataset (a folder under its derivatives/ is fine) and must be
    creatable and writable. Nothing is created here: that waits until the inputs have passed."""
    out = Path(output_dir).expanduser().resolve()
    bids_dir = bids_dir.resolve()
    deriv = bids_dir / "derivatives"
    if out == bids_dir or out == deriv or (bids_dir in out.parents and deriv not in out.parents):
        raise UsageError(f"OUTPUT_DIR {output_dir} is inside BIDS_DIR's raw data; use a folder outside it "
                         f"or under {deriv}")
    check_writable(out, "OUTPUT_DIR")
    return out


def check_writable(path: Path, what: str) -> None:
    """``path`` is a writable folder, or can be created as one."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"cannot create {what} {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path} is not writable (no write permission on {probe})")


def ensure_writable_dir(path: Path, what: str) -> Path:
    check_writable(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {what} {path}: {exc.strerror}") from None
    return path


def _validator_exe() -> str | None:
    exe = shutil.which("bids-validator-deno") or str(Path(sys.executable).with_name("bids-validator-deno"))
    return exe if Path(exe).exists() or shutil.which(exe) else None


#: top-level folders the validator never reads for a raw dataset; not linked into a subset view
_NOT_VALIDATED = {"derivatives", "sourcedata", "code"}


def _subset_view(bids_dir: Path, subjects: list[str], view: Path) -> Path:
    """``view``: symbolic links to the top-level entries of BIDS_DIR (dataset_description.json,
    participants.tsv, .bidsignore, inherited sidecars, phenotype/, ...) and to the ``subjects``
    folders only. Nothing is written in BIDS_DIR."""
    with os.scandir(bids_dir) as entries:
        for e in entries:
            if e.name.startswith("sub-") and e.name[4:] not in subjects:
                continue
            if e.name in _NOT_VALIDATED and e.is_dir():
                continue
            (view / e.name).symlink_to(Path(e.path).resolve())
    return view


#: errors that only a subset view can raise: a top-level sidecar (``task-rest_bold.json``) whose
#: data files are all in subjects left out; participants.tsv rows of subjects left out
_SUBSET_ARTEFACTS = {"SIDECAR_WITHOUT_DATAFILE", "PARTICIPANT_ID_MISMATCH"}


def _subset_artefact(issue: dict) -> bool:
    where = str(issue.get("location", ""))
    return issue.get("code") in _SUBSET_ARTEFACTS and where.count("/") <= 1


def run_validator(bids_dir: Path, subjects: list[str] | None = None) -> None:
    """bids-validator-deno; errors → exit 16 with the first error. Missing validator → warning.

    With ``subjects``, only their folders and the top-level files are validated (a view of
    symbolic links in a temporary folder): a one-subject job does not validate the whole
    dataset again, and an unselected subject's problems do not stop it."""
    import tempfile

    exe = _validator_exe()
    if exe is None:
        LOG.warning("bids-validator-deno not found; skipping BIDS validation")
        return
    with tempfile.TemporaryDirectory(prefix="bids_adhd_validate_") as tmp:
        target = _subset_view(bids_dir, subjects, Path(tmp)) if subjects else bids_dir
        try:
            proc = subprocess.run([exe, "--json", str(target)], capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            LOG.warning("BIDS validator could not run (%s); skipping validation", exc)
            return
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        LOG.warning("BIDS validator gave no JSON (exit %s); skipping validation", proc.returncode)
        return
    issues = report.get("issues", {}).get("issues", [])
    errors = [i for i in issues if i.get("severity") == "error" and not (subjects and _subset_artefact(i))]
    if errors:
        first = errors[0]
        where = first.get("location", "")
        scope = f" (subjects {', '.join(subjects)} and the top-level files)" if subjects else ""
        raise ValidationError(f"BIDS validation{scope} failed with {len(errors)} error(s); first: "
                              f"{first.get('code')} {where} (fix the dataset or pass --skip-bids-validation)")


# --- selection -------------------------------------------------------------

def _read_filters(path) -> dict:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"--bids-filter-file {path} does not exist")
    try:
        filters = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UsageError(f"--bids-filter-file {path} is not valid JSON: {exc}") from None
    if not isinstance(filters, dict) or not all(isinstance(v, dict) for v in filters.values()):
        raise UsageError(f"--bids-filter-file {path} must map query names to filter objects, e.g. "
                         '{"dwi": {"acquisition": "hardi"}}')
    unknown = set(filters) - {"dwi", "t1w"}
    if unknown:
        raise UsageError(f"--bids-filter-file {path}: unknown query {', '.join(sorted(unknown))} (use dwi, t1w)")
    return filters.get("dwi", {})


def subject_folders(bids_dir: Path) -> list[str]:
    """Labels of the ``sub-<label>`` folders of BIDS_DIR (one directory listing, no indexing)."""
    with os.scandir(bids_dir) as entries:
        return sorted(e.name[4:] for e in entries
                      if e.name.startswith("sub-") and len(e.name) > 4 and e.is_dir())


def _layout(bids_dir: Path, subjects: list[str] | None):
    """A pybids layout of the top-level files and the ``subjects`` folders only (all if None).

    The other subjects' folders are not entered, parsed nor read for metadata
    (pybids still tests each top-level name once against the ignore pattern), so
    what is broken in an unselected subject cannot stop the job and its cost
    hardly grows with the dataset (``benchmarks/scale.py``). Top-level files
    (``dwi.json``, ...) are indexed: BIDS inheritance works.
    """
    from bids import BIDSLayout, BIDSLayoutIndexer
    from bids.layout.validation import DEFAULT_LOCATIONS_TO_IGNORE

    ignore = list(DEFAULT_LOCATIONS_TO_IGNORE)
    if subjects:
        keep = "|".join(re.escape(s) for s in subjects)
        ignore.append(re.compile(rf"^/sub-(?!(?:{keep})(?:/|$))[^/]*"))
    indexer = BIDSLayoutIndexer(validate=False, ignore=ignore)
    try:
        return BIDSLayout(str(bids_dir), validate=False, derivatives=False, indexer=indexer)
    except Exception as exc:  # pybids raises many types for a broken tree
        raise ValidationError(f"cannot index {bids_dir} as BIDS: {str(exc).splitlines()[0]}") from None


def select_subjects(bids_dir: Path, participant_label=None) -> list[str] | None:
    """The cleaned ``--participant-label`` values (None: all), each with a folder in BIDS_DIR."""
    subjects = clean_labels(participant_label, "sub")
    _check_selection(bids_dir, subjects)
    return subjects


def _check_selection(bids_dir: Path, subjects: list[str] | None) -> None:
    available = subject_folders(bids_dir)
    if not available:
        raise NothingSelectedError(f"{bids_dir} holds no sub-* folders with data")
    missing = [s for s in subjects or () if s not in available]
    if missing:
        raise NothingSelectedError(
            f"participant label(s) {', '.join('sub-' + s for s in missing)} not found in {bids_dir}; "
            f"available: {', '.join('sub-' + s for s in available[:10])}{' ...' if len(available) > 10 else ''}")


def collect_runs(bids_dir: Path, participant_label=None, session_label=None, filter_file=None) -> list[DwiRun]:
    """Every DWI run selected by the labels and filters, sorted; errors if none.

    Only the selected subjects are indexed (see :func:`_layout`)."""
    subjects = clean_labels(participant_label, "sub")
    sessions = clean_labels(session_label, "ses")
    filters = _read_filters(filter_file)
    _check_selection(bids_dir, subjects)
    layout = _layout(bids_dir, subjects)
    query = {"suffix": "dwi", "extension": [".nii.gz", ".nii"], "return_type": "object", **filters}
    if subjects:
        query["subject"] = subjects
    if sessions:
        query["session"] = sessions
    try:
        files = layout.get(**query)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"bad BIDS filter: {exc}") from None
    runs = [_dwi_run(layout, f, bids_dir) for f in sorted(files, key=lambda f: f.path)]
    if not runs:
        what = []
        if subjects:
            what.append("participants " + ", ".join(subjects))
        if sessions:
            what.append("sessions " + ", ".join(sessions))
        if filters:
            what.append(f"filters {filters}")
        raise NothingSelectedError(f"no DWI series selected ({'; '.join(what) or 'whole dataset'}); "
                                   "check the labels and --bids-filter-file")
    return runs


def _dwi_run(layout, f, bids_dir: Path) -> DwiRun:
    """One selected DWI file with its b-table, sidecar and inherited metadata."""
    dwi = Path(f.path)
    _check_name_entities(dwi, bids_dir, f.get_entities())
    stem = dwi.name[: -len("".join(dwi.suffixes[-2:]) if dwi.name.endswith(".nii.gz") else dwi.suffix)]
    bval = _sidecar(layout, f, ".bval", dwi.parent / f"{stem}.bval")
    bvec = _sidecar(layout, f, ".bvec", dwi.parent / f"{stem}.bvec")
    sidecar = dwi.parent / f"{stem}.json"
    try:
        metadata = f.get_metadata()
    except Exception as exc:
        raise DataError(f"cannot read the JSON sidecar of {dwi.name}: {str(exc).splitlines()[0]}") from None
    return DwiRun(Source.from_entities(f.get_entities()), dwi, bval, bvec,
                  sidecar if sidecar.is_file() else None, metadata)


def _check_name_entities(dwi: Path, bids_dir: Path, entities) -> None:
    """The entities pybids parsed must be exactly the ones in the file name.

    pybids matches ``sub-café`` as subject ``caf``, ``run-1b`` as run 1, and a
    ``sub-ü`` file as having no subject at all: derivatives named after them
    would collide or lose the subject. Such a file is refused (exit 65).
    """
    try:
        folders = list(dwi.parent.relative_to(bids_dir).parts)
    except ValueError:
        folders = []
    rel = "/".join(folders + [dwi.name])
    if entities.get("subject") is None:
        raise DataError(f"{rel}: no valid 'sub-<label>' entity in the file name (labels are ASCII letters "
                        "and digits only); rename the file")
    for token in dwi.name.split(".")[0].split("_")[:-1] + folders:
        key, _, value = token.partition("-")
        entity = KEY_ENTITIES.get(key)
        if entity is None:
            continue
        parsed = entities.get(entity)
        if not _LABEL.match(value) or parsed is None or str(parsed) != value:
            raise DataError(f"{rel}: {token!r} is not a valid BIDS entity (labels are ASCII letters and digits "
                            "only, and must match the folder names); rename the file")


def _sidecar(layout, bidsfile, ext: str, fallback: Path) -> Path:
    """The .bval/.bvec of a DWI file, honouring BIDS inheritance."""
    try:
        found = layout.get_bval(bidsfile.path) if ext == ".bval" else layout.get_bvec(bidsfile.path)
    except Exception:
        found = None
    if found:
        return Path(found)
    if fallback.is_file():
        return fallback
    raise MissingInputError(f"{Path(bidsfile.path).name} has no {ext} file (expected {fallback.name} beside it)")


# --- data checks -----------------------------------------------------------

def read_btable(bval_path: Path, bvec_path: Path, n_volumes: int, b0_threshold: float = 50.0):
    """Parse and check a b-table; returns (bvals (N,), bvecs (N,3)) or raises DataError."""
    def _load(path: Path):
        try:
            text = path.read_text(encoding="utf-8")
            rows = [r.split() for r in text.strip().splitlines() if r.strip()]
            arr = np.array(rows, dtype=float)
        except (ValueError, UnicodeDecodeError):
            raise DataError(f"{path.name} is not a table of numbers") from None
        if arr.size == 0:
            raise DataError(f"{path.name} is empty")
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{path.name} contains NaN or Inf")
        return arr

    bvals = _load(bval_path)
    if bvals.ndim != 2 or 1 not in bvals.shape:
        raise DataError(f"{bval_path.name} must be one row of b-values (got shape {bvals.shape})")
    bvals = bvals.ravel()
    bvecs = _load(bvec_path)
    if bvecs.ndim != 2:
        raise DataError(f"{bvec_path.name} must be 3 rows of numbers")
    if bvecs.shape[0] != 3:
        hint = " (it looks transposed: BIDS wants 3 rows × N columns)" if bvecs.shape[1] == 3 else ""
        raise DataError(f"{bvec_path.name} has {bvecs.shape[0]} rows, expected 3{hint}")
    bvecs = bvecs.T
    if len(bvals) != n_volumes:
        raise DataError(f"{bval_path.name} has {len(bvals)} b-values but the image has {n_volumes} volumes")
    if len(bvecs) != n_volumes:
        raise DataError(f"{bvec_path.name} has {len(bvecs)} b-vectors but the image has {n_volumes} volumes")
    if np.any(bvals < 0):
        raise DataError(f"{bval_path.name} has negative b-values")
    if bvals.max() > 5e4:
        raise DataError(f"{bval_path.name}: b-values up to {bvals.max():.3g} look like s/m², BIDS uses s/mm²")
    is_b0 = bvals <= b0_threshold
    if not is_b0.any():
        raise DataError(f"{bval_path.name} has no b=0 volume (none ≤ {b0_threshold:g} s/mm²); "
                        "a b0 is needed for the mask, motion reference and tensor fit")
    if is_b0.all():
        raise DataError(f"{bval_path.name} has only b=0 volumes; no diffusion weighting to fit")
    norms = np.linalg.norm(bvecs[~is_b0], axis=1)
    if np.any(norms < 1e-6):
        raise DataError(f"{bvec_path.name} has all-zero b-vectors for diffusion-weighted volumes "
                        f"({int(np.sum(norms < 1e-6))} of them)")
    if np.any(np.abs(norms - 1) > 0.1):
        raise DataError(f"{bvec_path.name} has b-vectors that are not unit length (norms "
                        f"{norms.min():.3g}–{norms.max():.3g}); normalise them and scale the b-values instead")
    if (~is_b0).sum() < 6:
        raise DataError(f"{bval_path.name} has {(~is_b0).sum()} diffusion-weighted volumes; a tensor needs ≥ 6")
    bvecs = bvecs.copy()
    bvecs[~is_b0] /= norms[:, None]
    bvecs[is_b0] = 0.0
    return bvals, bvecs


def load_dwi_header(path: Path):
    """Open a DWI NIfTI lazily and check its header; returns the nibabel image."""
    import nibabel as nib

    if path.stat().st_size == 0:
        raise DataError(f"{path.name} is an empty file")
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise DataError(f"{path.name} is not a readable NIfTI image ({exc.__class__.__name__})") from None
    shape = img.shape
    if len(shape) != 4:
        raise DataError(f"{path.name} is {len(shape)}D (shape {shape}); a DWI series must be 4D")
    if shape[3] < 7:
        raise DataError(f"{path.name} has only {shape[3]} volumes; a tensor fit needs a b0 and ≥ 6 directions")
    if int(np.prod(shape, dtype=np.int64)) > MAX_ELEMENTS:
        raise DataError(f"{path.name} header claims {shape} voxels×volumes, beyond what a DWI series can be")
    _check_size_claim(path, img)
    if min(shape[:3]) < 4:
        raise DataError(f"{path.name} has a spatial dimension below 4 voxels (shape {shape})")
    affine = img.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise DataError(f"{path.name} has a non-invertible or non-finite affine; fix its qform/sform")
    zooms = np.asarray(img.header.get_zooms()[:3], float)
    if np.any(zooms <= 0) or zooms.max() / zooms.min() > 5:
        raise DataError(f"{path.name} voxel size {tuple(zooms.round(3))} mm is degenerate or too anisotropic "
                        "(ratio > 5) for DTI")
    return img


#: deflate cannot compress by more than ~1032:1; a .nii.gz whose header needs more
#: bytes than this many times its size is truncated or lies about its dimensions.
MAX_GZIP_RATIO = 1100


def _check_size_claim(path: Path, img) -> None:
    """Refuse a header that asks for far more data than the file can hold, before anything is
    allocated (nibabel would allocate the full claimed array first, then find the data short)."""
    header = img.header
    try:
        need = int(np.prod(img.shape, dtype=np.int64)) * header.get_data_dtype().itemsize
        need += int(header.get_data_offset())
    except Exception:
        return
    size = path.stat().st_size
    if path.name.endswith(".gz"):
        if need > size * MAX_GZIP_RATIO:
            raise DataError(f"{path.name} header claims shape {tuple(img.shape)} ({need / 1e6:.4g} MB of data) "
                            f"but the compressed file has only {size} bytes: truncated, or a corrupt header")
    elif size < need:
        raise DataError(f"{path.name} is truncated: its header needs {need} bytes, the file has {size}")


def load_dwi_data(path: Path, img=None) -> np.ndarray:
    """Read the voxels (float32) and refuse truncated files and non-finite values."""
    img = img if img is not None else load_dwi_header(path)
    try:
        data = img.get_fdata(dtype=np.float32)
    except Exception as exc:
        raise DataError(f"{path.name} cannot be read completely (truncated or corrupt: "
                        f"{exc.__class__.__name__})") from None
    if not np.all(np.isfinite(data)):
        n = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
        raise DataError(f"{path.name} has {n} NaN/Inf voxel values; replace them (e.g. by 0) before processing")
    return data


def check_run(run: DwiRun, b0_threshold: float = 50.0, read_data: bool = True) -> dict:
    """All cheap checks of one run; returns a summary (shape, zooms, n_b0, shells)."""
    for p in (run.dwi, run.bval, run.bvec):
        if p.is_symlink() and not p.exists():
            raise MissingInputError(f"{p} is a symbolic link to {os.readlink(p)}, which does not exist here "
                                    "(a DataLad dataset needs 'datalad get'; in a container, mount the target too)")
        if not p.is_file():
            raise MissingInputError(f"{p} is missing")
    img = load_dwi_header(run.dwi)
    bvals, bvecs = read_btable(run.bval, run.bvec, img.shape[3], b0_threshold)
    if read_data:
        load_dwi_data(run.dwi, img)
    return {"shape": tuple(int(s) for s in img.shape), "zooms": tuple(float(z) for z in img.header.get_zooms()[:3]),
            "n_b0": int((bvals <= b0_threshold).sum()),
            "shells": sorted({int(round(b, -2)) for b in bvals[bvals > b0_threshold]})}


# --- labels for the group level ------------------------------------------------

def participants_warnings(bids_dir: Path) -> list[str]:
    """What is wrong with participants.tsv, as warnings: the participant level does not need it
    (it processes the sub-* folders), but the group level takes its labels from it and refuses
    duplicates, so say so early. Never raises."""
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        return [f"{path.name} is missing; the group level will need it for the labels"]
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        return [f"{path.name} cannot be read ({exc.__class__.__name__}); the group level will refuse it"]
    header = lines[0].split("\t") if lines else []
    if "participant_id" not in header:
        return [f"{path.name} has no participant_id column; the group level will refuse it"]
    col = header.index("participant_id")
    out, seen = [], set()
    for i, ln in enumerate(lines[1:], start=2):
        cells = ln.split("\t")
        pid = cells[col].strip() if len(cells) > col else ""
        if pid in seen:
            out.append(f"{path.name} lists {pid} twice (line {i}); the group level will refuse it")
        seen.add(pid)
    folders = {p.name for p in Path(bids_dir).glob("sub-*") if p.is_dir()}
    unlisted = sorted(folders - seen)
    if unlisted:
        out.append(f"{path.name} has no row for {', '.join(unlisted[:5])}{' ...' if len(unlisted) > 5 else ''}; "
                   "processed anyway, left out at the group level")
    extra = sorted(seen - folders)
    if extra:
        out.append(f"{path.name} lists {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} without a "
                   "sub-* folder in BIDS_DIR")
    return out


def read_participants(bids_dir: Path) -> list[dict]:
    """participants.tsv as a list of row dicts ('n/a' → None)."""
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        raise MissingInputError(f"{path} is missing; the group level needs it for the labels")
    return read_table(path)


def read_table(path: Path) -> list[dict]:
    """A BIDS TSV with a ``participant_id`` column (participants.tsv, phenotype/*.tsv) as row dicts;
    cells are stripped of surrounding blanks, 'n/a' and empty cells → None; a ragged row, a row
    without participant_id or a participant listed twice is a ``DataError``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()      # -sig: a spreadsheet's BOM is dropped
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise MissingInputError(f"{path} cannot be read ({exc.__class__.__name__})") from None
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise DataError(f"{path} is empty")
    header = [h.strip() for h in lines[0].split("\t")]
    if "participant_id" not in header:
        raise DataError(f"{path} has no participant_id column")
    rows, seen = [], set()
    for i, ln in enumerate(lines[1:], start=2):
        cells = ln.split("\t")
        if len(cells) != len(header):
            raise DataError(f"{path} line {i} has {len(cells)} cells, the header has {len(header)}")
        row = {k: (None if v.strip() in ("n/a", "") else v.strip()) for k, v in zip(header, cells)}
        pid = row["participant_id"]
        if pid is None:
            raise DataError(f"{path} line {i} has no participant_id")
        if pid in seen:
            raise DataError(f"{path} lists {pid} twice (line {i})")
        seen.add(pid)
        rows.append(row)
    return rows

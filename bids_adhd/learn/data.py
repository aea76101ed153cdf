"""Group-level inputs: find the template-space maps, turn them into network inputs.

What the network reads
----------------------
For every run the participant level writes, on the preset's template grid
(:func:`bids_adhd.dmri.template.template_grid`)::

    <src>_space-MNI152NLin2009aSym_model-tensor_param-fa_dwimap.nii.gz
    <src>_space-MNI152NLin2009aSym_model-tensor_param-md_dwimap.nii.gz
    <src>_space-MNI152NLin2009aSym_desc-brain_mask.nii.gz

:func:`load_input` turns them into one ``(C, D, H, W)`` float32 array, one
channel per entry of ``ModelConfig.channels``:

* **FA** is used as it is (a fraction in [0, 1]; clipped to [0, 1]).
* **MD** (mm²/s) is divided by ``MD_SCALE`` = 3.0e-3 mm²/s (free water at
  body temperature) and clipped to [0, 1], so that brain tissue (≈0.7e-3)
  lands near 0.23 and CSF near 1 — the same [0, 1] window as FA and as the
  CT intensities CT-FM was pre-trained on (see ``models/ct-fm.json``).
* Everything outside the template-space brain mask is set to 0 (like air
  in the CT window).
* Optional per-subject normalisation (``ModelConfig.intensity``):
  ``none`` (the paper preset: the fixed mapping above, nothing else);
  ``mean``: each channel divided by its mean inside the brain mask and
  multiplied by ``MEAN_TARGET`` (0.3), which removes a subject's global
  scale (scanner, noise floor, head-size partial volume) but keeps the
  contrast and the zero background; ``zscore``: (x − mean) / SD inside the
  mask, 0 outside.

A map whose grid differs from the model's grid (another ``--pipeline`` at the
participant level) is resampled: both grids are axis-aligned in the same
template space, so this is a trilinear interpolation in world coordinates,
with a Gaussian anti-aliasing pre-filter (FWHM = the new voxel size) when
going to a coarser grid; the mask is resampled linearly and thresholded at 0.5.

Streaming
---------
:class:`RunImages` holds the runs' map paths in a ``monai.data.CacheDataset``
whose cache is bounded (``BIDS_ADHD_CACHE_MB``, default :data:`CACHE_MB` = 512 MiB:
151 runs of one 96³ channel, 75 of two, 4,096 of one 32³ channel): the runs beyond the bound
are read from disk for every batch that uses them (:func:`batch_loader`, a
torch ``DataLoader`` with ``TrainConfig.num_workers`` processes reading
ahead). Prediction and feature passes read their batches through
:class:`ItemImages`. Nothing holds every subject in memory, so a group level
of 2,000 subjects needs about the memory of one of 200 (measured:
``benchmarks/scale.py``). The augmentation (group.py) runs in the main
process, on each batch, so that its random state stays reproducible.

Synthetic template-space maps for the group level's tests and benchmarks
(no participant level) are written by :mod:`bids_adhd.simulate_maps`.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import derivatives as dv
from ..entities import KEY_ENTITIES
from ..errors import DataError, UsageError

LOG = logging.getLogger("bids_adhd.group")

MD_SCALE = 3.0e-3
"""MD (mm²/s) is divided by this (free water at 37 °C) and clipped to [0, 1]."""
MEAN_TARGET = 0.3
"""``intensity: mean`` rescales each channel to this mean inside the brain mask."""
INTENSITY_MODES = ("none", "mean", "zscore")

_MAP_RE = re.compile(r"^(?P<prefix>sub-[A-Za-z0-9]+(?:_[a-z]+-[A-Za-z0-9]+)*)_space-"
                     + re.escape(dv.TEMPLATE_SPACE) + r"_model-tensor_param-fa_dwimap\.nii(\.gz)?$")
_ENT = KEY_ENTITIES


@dataclass(frozen=True)
class RunMaps:
    """The template-space maps of one run."""

    source: dv.Source
    fa: Path
    md: Path
    mask: Path

    @property
    def subject(self) -> str:
        return self.source.subject

    def paths(self) -> dict:
        return {"fa": self.fa, "md": self.md, "mask": self.mask}


def source_from_prefix(prefix: str) -> dv.Source | None:
    ents = {}
    for part in prefix.split("_"):
        key, _, value = part.partition("-")
        if key not in _ENT or not value:
            return None
        ents[_ENT[key]] = value
    try:
        return dv.Source(**ents)
    except Exception:
        return None


def run_maps(root, src: dv.Source) -> RunMaps:
    """The expected template-space file names of one run (whether or not they exist)."""
    return RunMaps(src, dv.dwimap(root, src, "fa", space=dv.TEMPLATE_SPACE),
                   dv.dwimap(root, src, "md", space=dv.TEMPLATE_SPACE),
                   dv.brain_mask(root, src, space=dv.TEMPLATE_SPACE))


def find_template_maps(out_root) -> tuple[dict[str, list[RunMaps]], dict[str, list[str]]]:
    """Scan OUTPUT_DIR for runs with template-space maps.

    Returns ``(complete, incomplete)``: subject → its runs that have FA, MD and
    the mask; subject → names of files missing for runs that have only some.
    """
    root = Path(out_root)
    complete: dict[str, list[RunMaps]] = {}
    incomplete: dict[str, list[str]] = {}
    for fa in sorted(root.glob("sub-*/**/dwi/*_param-fa_dwimap.nii*")):
        m = _MAP_RE.match(fa.name)
        if not m:
            continue
        src = source_from_prefix(m.group("prefix"))
        if src is None:
            continue
        rm = run_maps(root, src)
        missing = [p.name for p in (rm.fa, rm.md, rm.mask) if not p.is_file()]
        if missing:
            incomplete.setdefault(src.subject, []).extend(missing)
        else:
            complete.setdefault(src.subject, []).append(rm)
    return complete, incomplete


# --- intensities and grids -----------------------------------------------------

def _load_image(path: Path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:
        raise DataError(f"{path.name} is not a readable NIfTI image ({exc.__class__.__name__}); "
                        "re-run the participant level for this subject") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path.name} is {data.ndim}D; a template-space map must be 3D")
    return np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0), np.asarray(img.affine, float)


def same_grid(shape_a, affine_a, shape_b, affine_b, tol: float = 1e-3) -> bool:
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=tol)


def resample_to_grid(data: np.ndarray, affine: np.ndarray, shape, target_affine: np.ndarray,
                     order: int = 1) -> np.ndarray:
    """Resample an image on one axis-aligned grid onto another (world coordinates, trilinear).

    Going to a coarser grid, a Gaussian pre-filter (FWHM = target voxel size,
    minus the source voxel size in quadrature) avoids aliasing: the one
    resampler, :func:`bids_adhd.dmri.template.resample_to_grid`, with ``"target"``.
    """
    from ..dmri.template import resample_to_grid as resample

    return resample(data, affine, shape, target_affine, order, prefilter_fwhm_mm="target")


def map_intensity(name: str, data: np.ndarray) -> np.ndarray:
    """The fixed mapping to [0, 1]: FA as is, MD / ``MD_SCALE``; both clipped."""
    if name == "fa":
        return np.clip(data, 0.0, 1.0)
    if name == "md":
        return np.clip(data / MD_SCALE, 0.0, 1.0)
    raise ValueError(f"unknown channel {name!r}")


def normalise(x: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Per-subject, per-channel normalisation inside ``mask`` (see the module docstring)."""
    if mode == "none":
        return x
    out = np.zeros_like(x)
    for c in range(x.shape[0]):
        v = x[c][mask]
        if v.size == 0:
            continue
        if mode == "mean":
            m = float(v.mean())
            out[c] = np.where(mask, x[c] * (MEAN_TARGET / m if m > 0 else 0.0), 0.0)
        elif mode == "zscore":
            m, s = float(v.mean()), float(v.std())
            out[c] = np.where(mask, (x[c] - m) / (s if s > 0 else 1.0), 0.0)
        else:
            raise ValueError(f"intensity must be one of {', '.join(INTENSITY_MODES)} (got {mode!r})")
    return out


def load_input(maps: RunMaps, channels: Sequence[str], grid: tuple, intensity: str = "none") -> np.ndarray:
    """One run's network input ``(C, D, H, W)`` float32 on ``grid = (shape, affine)``."""
    shape, affine = grid
    mask, m_aff = _load_image(maps.mask)
    if not same_grid(mask.shape, m_aff, shape, affine):
        mask = resample_to_grid(mask, m_aff, shape, affine)
    mask = mask >= 0.5
    if not mask.any():
        raise DataError(f"{maps.mask.name} is empty on the model grid; re-run the participant level")
    chans = []
    for name in channels:
        path = maps.fa if name == "fa" else maps.md
        data, aff = _load_image(path)
        if not same_grid(data.shape, aff, shape, affine):
            data = resample_to_grid(data, aff, shape, affine)
        chans.append(np.where(mask, map_intensity(name, data), 0.0).astype(np.float32))
    x = np.stack(chans)
    return normalise(x, mask, intensity).astype(np.float32)


def grid_of(path: Path) -> tuple[tuple, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    return tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, float)


# --- MONAI dataset: streamed per batch, bounded cache ---------------------------------

#: default memory bound (MiB) of the cache of loaded network inputs; ``BIDS_ADHD_CACHE_MB`` overrides
CACHE_MB = 512.0


def cache_mb() -> float:
    """The cache bound in MiB: ``$BIDS_ADHD_CACHE_MB`` if set (0: no cache), else :data:`CACHE_MB`."""
    raw = os.environ.get("BIDS_ADHD_CACHE_MB")
    if raw in (None, ""):
        return CACHE_MB
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"BIDS_ADHD_CACHE_MB={raw!r} is not a number of MiB") from None
    if value < 0:
        raise UsageError(f"BIDS_ADHD_CACHE_MB must be ≥ 0 (got {raw})")
    return value


def _load_transform(channels, grid, intensity: str):
    """``{"maps": RunMaps}`` → ``{"image": (C, D, H, W) float32 tensor}``; deterministic (cacheable)."""
    from monai.transforms import Compose, MapTransform

    class LoadRunMapsd(MapTransform):
        def __init__(self):
            super().__init__(keys=["maps"])

        def __call__(self, item: dict) -> dict:
            import torch
            return {"image": torch.from_numpy(load_input(item["maps"], channels, grid, intensity))}

    return Compose([LoadRunMapsd()])


class RunImages:
    """The network inputs of a list of runs, read from disk when a batch needs them.

    A MONAI ``CacheDataset`` over the runs' map paths: the first runs, as many as fit in
    ``cache_mb`` MiB, are loaded once and kept (shared by all folds); every other run is
    read again whenever a batch uses it. Memory grows with the batch and the cache bound,
    not with the number of subjects.
    """

    def __init__(self, maps: Sequence[RunMaps], channels, grid: tuple, intensity: str = "none",
                 cache_mib: float | None = None, num_workers: int = 0):
        from monai.data import CacheDataset

        per_item = 4 * len(channels) * int(np.prod(grid[0]))
        bound = cache_mb() if cache_mib is None else float(cache_mib)
        self.cache_num = min(len(maps), int(bound * 2 ** 20 // per_item))
        self.dataset = CacheDataset([{"maps": m} for m in maps], transform=_load_transform(channels, grid, intensity),
                                    cache_num=self.cache_num, num_workers=max(1, int(num_workers)),
                                    progress=False, copy_cache=False)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[int(index)]["image"]


def image_of(item: dict):
    """The input tensor of an item: its ``image``, or entry ``index`` of its ``images`` (:class:`RunImages`)."""
    return item["image"] if "image" in item else item["images"][item["index"]]


class ItemImages(SequenceABC):
    """The input tensors of ``items`` as a lazy sequence: an image is read when it is indexed, a
    slice is another lazy sequence. ``predict``/``features`` loops take their batches from it."""

    def __init__(self, items):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ItemImages(self.items[index])
        return image_of(self.items[index])


class _ItemsDataset:
    def __init__(self, items):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int):
        return image_of(self.items[j])


def batch_loader(items: Sequence[dict], batches: Sequence[Sequence[int]], num_workers: int = 0):
    """The images of ``items[j] for j in batch``, one list per batch, in order, through a torch
    ``DataLoader`` with ``num_workers`` processes reading ahead (0: read in this process)."""
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(_ItemsDataset(items), batch_sampler=[list(b) for b in batches], collate_fn=list,
                      num_workers=int(num_workers), generator=torch.Generator().manual_seed(0),
                      persistent_workers=False)


# --- the model's own frame (orientation, value range) ---------------------------------

#: Axis codes of the template grid every map is on (``dmri.template.template_grid``: a positive diagonal affine).
GRID_AXCODES = ("R", "A", "S")


@dataclass(frozen=True)
class ModelFrame:
    """How a template-grid array is turned into the array a foundation model reads.

    ``ornt``: nibabel orientation rows ``(target axis, ±1)`` per source axis
    (:func:`nibabel.orientations.ornt_transform`); ``value_range``: the
    model's input range, onto which the data module's [0, 1] maps linearly.
    Built from a manifest's ``input`` by :func:`model_frame`.
    """

    source: tuple = GRID_AXCODES
    target: tuple = GRID_AXCODES
    ornt: tuple = ((0, 1), (1, 1), (2, 1))
    value_range: tuple = (0.0, 1.0)

    def apply(self, x):
        """``x`` (``(..., D, H, W)`` on the template grid, numpy or torch) in the model's frame."""
        nd = x.ndim
        flips = [nd - 3 + i for i, (_, sign) in enumerate(self.ornt) if sign < 0]
        perm = list(range(nd - 3)) + [0, 0, 0]
        for src, (dst, _) in enumerate(self.ornt):
            perm[nd - 3 + int(dst)] = nd - 3 + src
        if hasattr(x, "permute"):                      # torch
            x = x.flip(flips) if flips else x
            x = x.permute(*perm)
        else:
            x = np.flip(x, flips) if flips else x
            x = np.transpose(x, perm)
        lo, hi = self.value_range
        return x if (lo, hi) == (0.0, 1.0) else x * (hi - lo) + lo


def model_frame(model_input: dict | None, grid_axcodes=GRID_AXCODES) -> ModelFrame:
    """The :class:`ModelFrame` of a manifest's ``input`` (its ``orientation``, ``value_range``).

    No ``orientation`` in the manifest: the grid's own (identity).
    """
    from nibabel.orientations import axcodes2ornt, ornt_transform

    model_input = model_input or {}
    target = tuple(str(model_input.get("orientation") or "".join(grid_axcodes)).upper())
    if len(target) != 3:
        raise DataError(f"orientation {''.join(target)!r} in the model manifest is not three axis codes")
    try:
        ornt = ornt_transform(axcodes2ornt(tuple(grid_axcodes)), axcodes2ornt(target))
    except Exception:
        raise DataError(f"orientation {''.join(target)!r} in the model manifest is not valid axis codes "
                        "(one of R/L, A/P, S/I per axis)") from None
    lo, hi = (float(v) for v in model_input.get("value_range", (0.0, 1.0)))
    return ModelFrame(tuple(grid_axcodes), target, tuple((int(a), int(b)) for a, b in ornt), (lo, hi))

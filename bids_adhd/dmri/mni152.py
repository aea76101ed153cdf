"""The MNI152 2009a (symmetric) template at 1 mm: the one place that reads it.

nilearn ships the maps (T1, grey matter, white matter; uint8, 197x233x189,
1 mm). They are read straight from nilearn's package data, which avoids
importing nilearn (seconds in a fresh process); if the files are not where
they are expected, nilearn's own loaders are used. The values are those of
nilearn's ``load_mni152_{template,gm_template,wm_template,brain_mask}``
(``resolution=1``) and ``load_mni152_wm_mask``, bit for bit
(``tests/test_template.py::test_mni152_loader_gives_nilearns_maps``).

Users: the registration target (:mod:`bids_adhd.dmri.template`), the
simulator, the synthetic template-space maps of the tests and benchmarks,
the saliency check and the group report's background.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
         "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
         "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}
#: nilearn's brain mask: the scaled T1 above this (``load_mni152_brain_mask``'s default)
BRAIN_THRESHOLD = 0.2


def _data_dir() -> Path | None:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "datasets" / "data"


def _read_with_nilearn() -> dict:   # pragma: no cover - depends on the nilearn install
    import warnings

    from ..errors import UsageError
    try:
        from nilearn import datasets
    except ImportError:
        raise UsageError("nilearn is needed for the MNI152 template (pip install nilearn)") from None
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, fn in (("t1", datasets.load_mni152_template), ("gm", datasets.load_mni152_gm_template),
                        ("wm", datasets.load_mni152_wm_template)):
            img = fn(resolution=1)
            # back to the file's 0..255 integers (nilearn divides them by their maximum, 255)
            out[key] = np.rint(np.asarray(img.get_fdata()) * 255).astype(np.uint8)
            out["affine"] = np.asarray(img.affine, float)
    return out


@functools.lru_cache(maxsize=1)
def raw_1mm() -> dict:
    """``{"t1", "gm", "wm"}``: the files' uint8 arrays (0..255), and ``"affine"``; read-only."""
    import nibabel as nib

    folder = _data_dir()
    if folder is not None and all((folder / n).is_file() for n in FILES.values()):
        out = {}
        for key, fname in FILES.items():
            img = nib.load(str(folder / fname))
            out[key] = np.asarray(img.dataobj)
            out["affine"] = np.asarray(img.affine, float)
    else:
        out = _read_with_nilearn()
    for v in out.values():
        v.setflags(write=False)
    return out


@functools.lru_cache(maxsize=1)
def maps_1mm() -> dict:
    """nilearn's scaled maps: ``t1``, ``gm``, ``wm`` float32 in [0, 1] (each file divided by its
    maximum, in float32, as nilearn does), ``brain`` (bool, T1 > 0.2) and ``affine``; read-only."""
    raw = raw_1mm()
    out = {}
    for key in FILES:
        a = raw[key].astype(np.float32)
        a /= a.max()
        out[key] = a
    out["brain"] = out["t1"] > BRAIN_THRESHOLD
    for v in out.values():
        v.setflags(write=False)
    out["affine"] = raw["affine"]
    return out


def image(key: str):
    """``t1``, ``gm``, ``wm`` or ``brain`` of :func:`maps_1mm` as a nibabel image (float32; brain as int8)."""
    import nibabel as nib

    maps = maps_1mm()
    data = maps[key].astype(np.int8) if key == "brain" else maps[key]
    return nib.Nifti1Image(np.array(data), maps["affine"])


def wm_mask(threshold: float = 0.2, closing_iterations: int = 2) -> np.ndarray:
    """nilearn's ``load_mni152_wm_mask``: WM probability > ``threshold``, then a binary closing (int8)."""
    from scipy.ndimage import binary_closing

    return binary_closing((maps_1mm()["wm"] > threshold).astype(np.int8),
                          iterations=closing_iterations).astype(np.int8)

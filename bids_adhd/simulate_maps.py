"""Synthetic template-space FA/MD maps with a planted effect: the group level's test and benchmark data.

What the participant level would write on the template grid, without
simulating and preprocessing DWI (seconds instead of minutes per subject):
:func:`write_synthetic_maps` (maps + a minimal BIDS root with
``participants.tsv``) and :func:`synthetic_effect_region` (the planted
region). Moved here from ``learn/data.py`` (issue 16): the simulator's
layer, below ``learn``; same numbers as there.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from . import derivatives as dv
from .config import TemplateConfig
from .dmri.mni152 import maps_1mm
from .dmri.template import resample_to_grid, template_grid
from .entities import TEMPLATE_SPACE


@functools.lru_cache(maxsize=4)
def _mni_on_grid(shape: tuple, affine_key: tuple) -> dict:
    """The MNI152 2009a WM/GM/brain maps (:mod:`bids_adhd.dmri.mni152`), smoothed to the grid's
    resolution and resampled."""
    affine = np.asarray(affine_key, float).reshape(4, 4)
    mni = maps_1mm()
    out = {}
    for key in ("wm", "gm", "brain"):
        out[key] = np.clip(resample_to_grid(mni[key].astype(np.float32), mni["affine"], shape, affine,
                                            prefilter_fwhm_mm="target"), 0, 1)
    out["brain"] = out["brain"] >= 0.5
    out["csf"] = np.clip(out["brain"] - out["wm"] - out["gm"], 0, 1)
    return out


#: The synthetic effect region: an MNI box (mm) intersected with WM probability > 0.5
#: (the same as the simulator's "frontal-callosal" region).
SYNTH_EFFECT_BOX_MM = {"x": (-30.0, 30.0), "y": (-10.0, 45.0), "z": (0.0, 35.0)}


def synthetic_effect_region(shape, affine, box=None) -> np.ndarray:
    box = box or SYNTH_EFFECT_BOX_MM
    mni = _mni_on_grid(tuple(shape), tuple(np.asarray(affine, float).ravel()))
    inside = mni["wm"] > 0.5
    for axis, key in enumerate("xyz"):
        lo, hi = box[key]
        coord = affine[axis, axis] * np.arange(shape[axis]) + affine[axis, 3]
        inside &= ((coord >= lo) & (coord <= hi)).reshape([-1 if a == axis else 1 for a in range(3)])
    return inside


def write_synthetic_maps(out_root, bids_root, n_subjects: int = 20, seed: int = 0, effect: float = 0.08,
                         template_cfg=None, sites=("SiteA", "SiteB"), noise_sd: float = 0.015,
                         sessions: int = 1, label_column: str = "diagnosis") -> list[dict]:
    """Write template-space FA/MD/mask maps for ``n_subjects`` and a minimal BIDS root with participants.tsv.

    The maps mimic what the participant level writes from the simulator's data:
    FA = WM·(0.45 + 0.25·WM) + 0.15·GM, MD = 0.7e-3·WM + 0.8e-3·GM + 3e-3·CSF
    (nilearn's MNI152 2009a maps), with per-subject variation: a global FA and
    MD scale N(1, 0.02), a smooth multiplicative FA field (SD 3 %, wavelengths
    80–160 mm), a residual misregistration (random shift, SD 1 mm) and voxel
    noise (``noise_sd``). ADHD subjects (half, shuffled) get FA × (1 − effect) in
    :func:`synthetic_effect_region`. Returns the participants rows.
    """
    from scipy import ndimage

    shape, affine = template_grid(template_cfg or TemplateConfig())
    mni = _mni_on_grid(tuple(shape), tuple(affine.ravel()))
    region = synthetic_effect_region(shape, affine)
    res = float(abs(affine[0, 0]))
    rng = np.random.default_rng([seed, 7])
    diag = np.array(["ADHD"] * (n_subjects // 2) + ["TD"] * (n_subjects - n_subjects // 2))
    diag = diag[rng.permutation(n_subjects)]
    ijk = np.indices(shape).reshape(3, -1).T
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    bids_root = Path(bids_root)
    bids_root.mkdir(parents=True, exist_ok=True)
    (bids_root / "dataset_description.json").write_text(json.dumps({"Name": "synthetic", "BIDSVersion": "1.10.0"}))
    rows = []
    width = max(2, len(str(n_subjects)))
    for i in range(n_subjects):
        sub = f"{i + 1:0{width}d}"
        a = np.random.default_rng([seed, 11, i])
        fa_scale = 1 + np.clip(a.normal(0, 0.02), -0.05, 0.05)
        md_scale = 1 + np.clip(a.normal(0, 0.02), -0.05, 0.05)
        k = 4
        dirs = a.normal(size=(k, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        waves = dirs * (2 * np.pi / a.uniform(80, 160, k))[:, None]
        field = 1 + np.cos(xyz @ waves.T + a.uniform(0, 2 * np.pi, k)) @ a.normal(0, 0.03 * np.sqrt(2 / k), k)
        field = np.clip(field, 0.9, 1.1).reshape(shape)
        row = {"participant_id": f"sub-{sub}", label_column: str(diag[i]),
               "age": f"{a.uniform(7, 17):.1f}", "sex": str(a.choice(["M", "F"])),
               "site": str(sites[int(a.integers(len(sites)))])}
        rows.append(row)
        for s in range(sessions):
            ses = f"{s + 1:02d}" if sessions > 1 else None
            n = np.random.default_rng([seed, 13, i, s])
            shift = n.normal(0, 1.0, 3) / res
            wm, gm, csf = (ndimage.shift(mni[t], shift, order=1, mode="constant") for t in ("wm", "gm", "csf"))
            brain = ndimage.shift(mni["brain"].astype(np.float32), shift, order=1, mode="constant") >= 0.5
            fa = (wm * (0.45 + 0.25 * wm) + 0.15 * gm) * fa_scale * field
            if effect and diag[i] == "ADHD":
                reg = ndimage.shift(region.astype(np.float32), shift, order=1, mode="constant")
                fa = fa * (1 - effect * reg)
            md = (0.7e-3 * wm + 0.8e-3 * gm + 3.0e-3 * csf) * md_scale
            fa = np.clip(fa + n.normal(0, noise_sd, shape), 0, 1) * brain
            md = np.clip(md * (1 + n.normal(0, noise_sd, shape)), 0, 3.5e-3) * brain
            src = dv.Source(subject=sub, session=ses)
            for path, data in ((dv.dwimap(out_root, src, "fa", space=TEMPLATE_SPACE), fa.astype(np.float32)),
                               (dv.dwimap(out_root, src, "md", space=TEMPLATE_SPACE), md.astype(np.float32)),
                               (dv.brain_mask(out_root, src, space=TEMPLATE_SPACE), brain.astype(np.uint8))):
                dv.write_nifti(path, nib.Nifti1Image(data, affine))
    cols = list(rows[0])
    text = "\t".join(cols) + "\n" + "".join("\t".join(r[c] for c in cols) + "\n" for r in rows)
    (bids_root / "participants.tsv").write_text(text)
    for r in rows:
        (bids_root / r["participant_id"]).mkdir(exist_ok=True)
    return rows

"""Where the model looks: saliency maps on the template grid, computed with MONAI's ``monai.visualize``.

No attribution code of our own: :func:`subject_saliency` calls MONAI's
``VanillaGrad`` (the gradient of the positive class's logit with respect to
the input maps; Simonyan et al. 2014) or ``GradCAM`` (Selvaraju et al. 2017,
on the last encoder level the read-out uses, upsampled by MONAI to the input
grid). MONAI is a core dependency (``install_requires``), so every install
has it. The group level averages the magnitude over each fold's test
subjects and then over the folds, and writes it as a NIfTI on the template
grid with a JSON sidecar (:func:`write_saliency`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import derivatives as dv

METHODS = ("vanillagrad", "gradcam")


def _target_layer(model) -> str:
    """The module name of the deepest encoder level the read-out uses (for Grad-CAM)."""
    depth = max(getattr(model, "levels", (0,))) if hasattr(model, "levels") else None
    if depth is not None and hasattr(model.encoder, "layers"):
        return f"encoder.layers.{depth}.blocks"
    raise ValueError("gradcam needs a SegResEncoder-style encoder (encoder.layers[i].blocks)")


def subject_saliency(model, image: torch.Tensor, device, method: str = "vanillagrad") -> np.ndarray:
    """|saliency| of one input (C, D, H, W) for the positive class, summed over channels: (D, H, W)."""
    from monai.visualize import GradCAM, VanillaGrad

    if method not in METHODS:
        raise ValueError(f"saliency method must be one of {METHODS} (got {method!r})")
    from .train import to_input

    model.eval()
    x = to_input(image.unsqueeze(0).float(), device)          # channels_last_3d (train.memory_format)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:                                      # the input's gradient only
            p.requires_grad_(False)
        with torch.enable_grad():
            if method == "vanillagrad":
                sal = VanillaGrad(model)(x, index=1)
            else:
                sal = GradCAM(model, target_layers=_target_layer(model))(x, class_idx=1)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return np.abs(sal.detach().float().cpu().numpy()[0]).sum(axis=0)


def mean_saliency(model, images, device, method: str = "vanillagrad") -> np.ndarray:
    """Mean over ``images`` of :func:`subject_saliency` (each normalised to a mean of 1 first, so that
    every subject weighs the same)."""
    acc = None
    for im in images:
        s = subject_saliency(model, im, device, method)
        s = s / max(float(s.mean()), 1e-12)
        acc = s if acc is None else acc + s
    return acc / max(1, len(images))


def write_saliency(path: Path, data: np.ndarray, grid: tuple, meta: dict | None = None,
                   method: str = "vanillagrad") -> Path:
    """The map as float32 NIfTI on ``grid`` (shape, affine; sform code 4 via derivatives) + JSON sidecar."""
    import nibabel as nib

    shape, affine = grid
    img = nib.Nifti1Image(np.asarray(data, np.float32).reshape(tuple(shape)), np.asarray(affine, float))
    img.set_sform(img.affine, code=4)
    img.set_qform(img.affine, code=4)
    dv.write_nifti(path, img)
    side = {"Description": "mean saliency magnitude of the ADHD classifier: |d logit(positive) / d input| "
                           if method == "vanillagrad" else "mean Grad-CAM of the ADHD classifier",
            "Method": {"vanillagrad": "monai.visualize.VanillaGrad", "gradcam": "monai.visualize.GradCAM"}[method],
            "Normalisation": "each subject's map scaled to a mean of 1 over the grid, then averaged over the "
                             "test subjects of each fold and over the folds",
            "Space": dv.TEMPLATE_SPACE, "Units": "arbitrary (relative)", **(meta or {})}
    dv.write_json(Path(str(path).replace(".nii.gz", ".json")), side)
    return Path(path)


def effect_ratio(saliency_path, effect_mask_path, wm_threshold: float = 0.5) -> dict:
    """Mean saliency inside the true effect region / in the white matter outside it.

    The effect mask (simulator truth, template space) and the MNI152
    white-matter mask (probability > ``wm_threshold``, closed as nilearn's
    ``load_mni152_wm_mask``; :func:`bids_adhd.dmri.mni152.wm_mask`) are
    resampled to the saliency grid nearest-neighbour (nilearn ``resample_to_img``).
    """
    import nibabel as nib
    from nilearn.image import resample_to_img

    from ..dmri import mni152

    sal = nib.load(str(saliency_path))
    data = np.asarray(sal.get_fdata())
    kw = {"interpolation": "nearest", "force_resample": True, "copy_header": True}
    effect = np.asarray(resample_to_img(nib.load(str(effect_mask_path)), sal, **kw).get_fdata()) > 0
    wm_img = nib.Nifti1Image(mni152.wm_mask(wm_threshold), mni152.maps_1mm()["affine"])
    wm = np.asarray(resample_to_img(wm_img, sal, **kw).get_fdata()) > 0
    outside = wm & ~effect
    inside_mean = float(data[effect].mean()) if effect.any() else float("nan")
    outside_mean = float(data[outside].mean()) if outside.any() else float("nan")
    return {"inside_effect": inside_mean, "wm_outside_effect": outside_mean,
            "ratio": inside_mean / outside_mean if outside_mean else float("nan"),
            "voxels_effect": int(effect.sum()), "voxels_wm_outside": int(outside.sum())}

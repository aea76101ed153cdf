"""Per-run workflows: DWI preprocessing + tensor maps, and the template-space step."""
from __future__ import annotations

from nipype.interfaces.utility import IdentityInterface
from nipype.pipeline import engine as pe

from ..config import PreprocConfig, TemplateConfig
from ..interfaces.dipy import (BrainMask, CheckDWI, Denoise, FitDTI, MotionCorrect, RegisterTemplate, Unring,
                               motion_eddy_axis)

PREPROC_OUTPUTS = ["dwi", "bval", "bvec", "mask", "b0", "motion", "motion_matrices", "fa", "md", "ad", "rd", "tensor", "v1",
                   "noise_sigma", "seconds"]


def init_dwi_preproc_wf(cfg: PreprocConfig, nthreads: int = 1, name: str = "dwi_preproc_wf",
                        phase_encoding: str | None = None) -> pe.Workflow:
    """Preprocess one DWI series and fit the tensor.

    Steps: check → pre-mask (raw mean b0, dilated: limits the denoising work) →
    denoise → Gibbs unringing → motion + eddy correction (each volume registered
    to its leave-one-out prediction, rigid then eddy along the phase-encoding
    axis, dropout slices replaced, b-vectors rotated by the rigid part) → brain
    mask (mean b0 of the corrected series) → DTI fit.

    ``phase_encoding``: the run's BIDS ``PhaseEncodingDirection`` (needed by the
    eddy stage, ``cfg.motion_eddy``; a one-line DataError here when it is missing).

    Inputs (``inputnode``)
        dwi_file, bval_file, bvec_file: the raw series and its b-table.
    Outputs (``outputnode``)
        dwi, bval, bvec: preprocessed series and rotated b-table;
        mask, b0: brain mask and mean b0; motion: TSV of motion parameters, FD,
        dropout slices, resampled flag per input volume; motion_matrices: JSON
        with the per-volume 4x4 head-motion and eddy matrices;
        fa, md, ad, rd, tensor, v1: native-space tensor maps;
        noise_sigma: MP-PCA noise level; seconds: per-step wall times.
    """
    wf = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(["dwi_file", "bval_file", "bvec_file"]), name="inputnode")
    outputnode = pe.Node(IdentityInterface(PREPROC_OUTPUTS), name="outputnode")

    check = pe.Node(CheckDWI(b0_threshold=cfg.b0_threshold), name="check")
    premask = pe.Node(BrainMask(b0_threshold=cfg.b0_threshold, median_radius=cfg.mask_median_radius,
                                numpass=cfg.mask_numpass, dilate=cfg.denoise_patch_radius + 2, nthreads=nthreads),
                      name="premask", n_procs=nthreads)
    denoise = pe.Node(Denoise(method=cfg.denoise, patch_radius=cfg.denoise_patch_radius,
                              stride=cfg.denoise_stride, nthreads=nthreads),
                      name="denoise", n_procs=nthreads)
    pe_dir = phase_encoding or ""
    motion_eddy_axis(cfg.motion and cfg.motion_eddy, pe_dir)       # the clear error at build time
    motion = pe.Node(MotionCorrect(b0_threshold=cfg.b0_threshold, enabled=cfg.motion,
                                   level_iters=list(cfg.motion_level_iters), factors=list(cfg.motion_factors),
                                   sigmas=list(cfg.motion_sigmas), sampling=float(cfg.motion_sampling),
                                   min_samples=int(cfg.motion_min_samples), rounds=int(cfg.motion_rounds),
                                   head_margin=-1 if cfg.motion_head_margin is None else int(cfg.motion_head_margin),
                                   eddy=bool(cfg.motion_eddy), eddy_model=cfg.motion_eddy_model, phase_encoding=pe_dir,
                                   slice_axis=int(cfg.motion_slice_axis), outliers=cfg.motion_outliers,
                                   outlier_z=float(cfg.motion_outlier_z), fd_radius=float(cfg.fd_radius_mm),
                                   nthreads=nthreads),
                     name="motion", n_procs=nthreads)
    mask = pe.Node(BrainMask(b0_threshold=cfg.b0_threshold, median_radius=cfg.mask_median_radius,
                             numpass=cfg.mask_numpass, nthreads=nthreads), name="mask", n_procs=nthreads)
    dti = pe.Node(FitDTI(method=cfg.dti_fit, bmax=cfg.dti_bmax, b0_threshold=cfg.b0_threshold,
                         nthreads=nthreads), name="dti", n_procs=nthreads)

    wf.connect([
        (inputnode, check, [("dwi_file", "in_file"), ("bval_file", "in_bval"), ("bvec_file", "in_bvec")]),
        (check, premask, [("out_file", "in_file"), ("out_bval", "in_bval")]),
        (check, denoise, [("out_file", "in_file"), ("out_bval", "in_bval")]),
        (premask, denoise, [("out_mask", "in_mask")]),
        (check, motion, [("out_bval", "in_bval"), ("out_bvec", "in_bvec")]),
        (motion, mask, [("out_file", "in_file"), ("out_bval", "in_bval")]),
        (motion, dti, [("out_file", "in_file"), ("out_bval", "in_bval"), ("out_bvec", "in_bvec")]),
        (mask, dti, [("out_mask", "in_mask")]),
        (motion, outputnode, [("out_file", "dwi"), ("out_bval", "bval"), ("out_bvec", "bvec"),
                              ("out_params", "motion"), ("out_matrices", "motion_matrices")]),
        (mask, outputnode, [("out_mask", "mask"), ("out_b0", "b0")]),
        (denoise, outputnode, [("noise_sigma", "noise_sigma")]),
        (dti, outputnode, [("out_fa", "fa"), ("out_md", "md"), ("out_ad", "ad"), ("out_rd", "rd"),
                           ("out_tensor", "tensor"), ("out_v1", "v1")]),
    ])
    if cfg.motion and cfg.denoise != "none":
        # moved volumes are registered from their undenoised copies (dmri/motion.py, 6.)
        motion.inputs.undenoised_gibbs = bool(cfg.gibbs)
        motion.inputs.gibbs_slice_axis, motion.inputs.gibbs_n_points = cfg.gibbs_slice_axis, cfg.gibbs_n_points
        wf.connect(check, "out_file", motion, "in_undenoised")
    if cfg.gibbs:
        unring = pe.Node(Unring(slice_axis=cfg.gibbs_slice_axis, n_points=cfg.gibbs_n_points,
                                nthreads=nthreads), name="unring", n_procs=nthreads)
        wf.connect([(denoise, unring, [("out_file", "in_file")]),
                    (unring, motion, [("out_file", "in_file")])])
    else:
        wf.connect(denoise, "out_file", motion, "in_file")
    return wf


def init_template_wf(cfg: TemplateConfig, nthreads: int = 1, name: str = "template_wf") -> pe.Workflow:
    """Register FA to MNI152NLin2009aSym and resample FA, MD and the mask onto the fixed grid.

    Inputs: fa, md, mask (native space).
    Outputs: xfm (ITK affine text, dwi → template), std_fa, std_md, std_mask, similarity.
    """
    import dataclasses

    wf = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(["fa", "md", "mask"]), name="inputnode")
    outputnode = pe.Node(IdentityInterface(["xfm", "std_fa", "std_md", "std_mask", "similarity"]),
                         name="outputnode")
    reg = pe.Node(RegisterTemplate(template=dataclasses.asdict(cfg), nthreads=nthreads), name="register",
                  n_procs=nthreads)
    wf.connect([
        (inputnode, reg, [("fa", "in_fa"), ("md", "in_md"), ("mask", "in_mask")]),
        (reg, outputnode, [("out_xfm", "xfm"), ("out_fa", "std_fa"), ("out_md", "std_md"),
                           ("out_mask", "std_mask"), ("similarity", "similarity")]),
    ])
    return wf

"""Thin Nipype interfaces: each reads its inputs, calls ONE plain function from
``bids_adhd.dmri`` (where the numerics live and are tested), and writes its
outputs into the node's working directory.

Heavy imports stay inside ``_run_interface`` so that building a workflow is cheap.
"""
from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec,
                                    isdefined, traits)

from ..config import EDDY_MODELS

LOG = logging.getLogger("bids_adhd.interfaces")


def _load(path, dtype=np.float32):
    import nibabel as nib

    img = nib.load(path)
    return np.asarray(img.get_fdata(dtype=np.float32) if dtype == np.float32 else img.dataobj, dtype=dtype), img


def _save(data, like, name, dtype=np.float32):
    """Write a work-dir image; uncompressed ``.nii`` (gzip costs seconds of CPU per demo DWI write,
    ``benchmarks/results/code_timings.md``, and the work dir is scratch: the sink compresses what it
    publishes)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), like.affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(like.affine, code=1)
    img.set_sform(like.affine, code=1)
    out = os.path.abspath(name)
    nib.save(img, out)
    return out


def _read_fsl(bval, bvec):
    bvals = np.loadtxt(bval, ndmin=1)
    bvecs = np.loadtxt(bvec, ndmin=2)
    return bvals, bvecs.T


def _write_fsl(bvals, bvecs, stem):
    bval_out, bvec_out = os.path.abspath(stem + ".bval"), os.path.abspath(stem + ".bvec")
    np.savetxt(bval_out, np.asarray(bvals)[None, :], fmt="%g")
    np.savetxt(bvec_out, np.asarray(bvecs).T, fmt="%.8f")
    return bval_out, bvec_out


class _Timed(SimpleInterface):
    """Runs ``self._compute()`` under a bounded thread pool and records its wall time."""

    def _run_interface(self, runtime):
        from threadpoolctl import threadpool_limits

        nthreads = int(getattr(self.inputs, "nthreads", 1) or 1) if hasattr(self.inputs, "nthreads") else 1
        t0 = time.perf_counter()
        with threadpool_limits(limits=nthreads):
            self._compute()
        self._results["seconds"] = time.perf_counter() - t0
        return runtime


class _Common(BaseInterfaceInputSpec):
    # nohash: the thread count does not change the result, so a re-run with another --nprocs or
    # another selection of runs (which changes the threads per node) reuses the cached nodes
    nthreads = traits.Int(1, usedefault=True, nohash=True, desc="threads/processes inside this node")


class _TimedOut(TraitedSpec):
    seconds = traits.Float(desc="wall time of the computation")


# --- load & check --------------------------------------------------------------

class _CheckInput(_Common):
    in_file = File(exists=True, mandatory=True)
    in_bval = File(exists=True, mandatory=True)
    in_bvec = File(exists=True, mandatory=True)
    b0_threshold = traits.Float(50.0, usedefault=True)


class _CheckOutput(_TimedOut):
    out_file = File(exists=True, desc="the DWI series as float32 NIfTI")
    out_bval = File(exists=True)
    out_bvec = File(exists=True, desc="unit b-vectors; zeros for b0 volumes")


class CheckDWI(_Timed):
    """Validate the raw series and its b-table (bids.read_btable) and write clean copies."""

    input_spec, output_spec = _CheckInput, _CheckOutput

    def _compute(self):
        from pathlib import Path

        from ..bids import load_dwi_data, load_dwi_header, read_btable

        img = load_dwi_header(Path(self.inputs.in_file))
        bvals, bvecs = read_btable(Path(self.inputs.in_bval), Path(self.inputs.in_bvec), img.shape[3],
                                   self.inputs.b0_threshold)
        data = load_dwi_data(Path(self.inputs.in_file), img)
        self._results["out_file"] = _save(data, img, "dwi.nii")
        self._results["out_bval"], self._results["out_bvec"] = _write_fsl(bvals, bvecs, "dwi")


# --- masks ---------------------------------------------------------------------

class _MaskInput(_Common):
    in_file = File(exists=True, mandatory=True)
    in_bval = File(exists=True, mandatory=True)
    b0_threshold = traits.Float(50.0, usedefault=True)
    median_radius = traits.Int(2, usedefault=True)
    numpass = traits.Int(2, usedefault=True)
    dilate = traits.Int(0, usedefault=True, desc="dilate the mask by this many voxels")


class _MaskOutput(_TimedOut):
    out_mask = File(exists=True)
    out_b0 = File(exists=True, desc="mean b0")


class BrainMask(_Timed):
    """Brain mask from the mean b0 (DIPY median_otsu's algorithm, median passes on threads), optionally dilated."""

    input_spec, output_spec = _MaskInput, _MaskOutput

    def _compute(self):
        from scipy.ndimage import binary_dilation

        from ..dmri.mask import brain_mask

        data, img = _load(self.inputs.in_file)
        bvals = np.loadtxt(self.inputs.in_bval, ndmin=1)
        mask, b0 = brain_mask(data, bvals, self.inputs.b0_threshold, self.inputs.median_radius,
                              self.inputs.numpass, nprocs=self.inputs.nthreads)
        if self.inputs.dilate > 0:
            mask = binary_dilation(mask, iterations=self.inputs.dilate)
        self._results["out_mask"] = _save(mask, img, "mask.nii", np.uint8)
        self._results["out_b0"] = _save(b0, img, "b0.nii")


# --- denoising & unringing -------------------------------------------------------

class _DenoiseInput(_Common):
    in_file = File(exists=True, mandatory=True)
    in_bval = File(exists=True, mandatory=True)
    in_mask = File(exists=True, desc="restrict the work to this mask (voxels outside keep their value)")
    method = traits.Enum("mppca", "patch2self", "none", usedefault=True)
    patch_radius = traits.Int(2, usedefault=True)
    stride = traits.Int(1, usedefault=True, desc="MP-PCA patch-centre step (1: every voxel, DIPY's result)")


class _DenoiseOutput(_TimedOut):
    out_file = File(exists=True)
    noise_sigma = traits.Float(desc="median noise σ in the mask (MP-PCA), or NaN")


class Denoise(_Timed):
    """MP-PCA (vectorised, equal to DIPY's mppca) or DIPY patch2self."""

    input_spec, output_spec = _DenoiseInput, _DenoiseOutput

    def _compute(self):
        from ..dmri import denoise as dn

        data, img = _load(self.inputs.in_file)
        bvals = np.loadtxt(self.inputs.in_bval, ndmin=1)
        mask = _load(self.inputs.in_mask)[0] > 0 if isdefined(self.inputs.in_mask) else None
        sigma = float("nan")
        if self.inputs.method == "mppca":
            out, sig = dn.mppca(data, mask=mask, patch_radius=self.inputs.patch_radius, return_sigma=True,
                                nprocs=self.inputs.nthreads, stride=self.inputs.stride)
            sel = sig[mask] if mask is not None else sig[sig > 0]
            sigma = float(np.median(sel)) if sel.size else float("nan")
        else:
            out = dn.denoise(data, self.inputs.method, bvals=bvals, mask=mask,
                             patch_radius=self.inputs.patch_radius, nprocs=self.inputs.nthreads)
        self._results["noise_sigma"] = sigma
        self._results["out_file"] = _save(out, img, "denoised.nii")


class _UnringInput(_Common):
    in_file = File(exists=True, mandatory=True)
    slice_axis = traits.Int(2, usedefault=True)
    n_points = traits.Int(3, usedefault=True)


class _FileOutput(_TimedOut):
    out_file = File(exists=True)


class Unring(_Timed):
    """Gibbs unringing (DIPY's gibbs_removal, real-FFT mode: within float rounding of it), parallel over slices."""

    input_spec, output_spec = _UnringInput, _FileOutput

    def _compute(self):
        from ..dmri.gibbs import unring

        data, img = _load(self.inputs.in_file)
        out = unring(data, slice_axis=self.inputs.slice_axis, n_points=self.inputs.n_points,
                     nprocs=self.inputs.nthreads)
        self._results["out_file"] = _save(out, img, "unrung.nii")


# --- motion ----------------------------------------------------------------------

class _MotionInput(_Common):
    in_file = File(exists=True, mandatory=True)
    in_bval = File(exists=True, mandatory=True)
    in_bvec = File(exists=True, mandatory=True)
    b0_threshold = traits.Float(50.0, usedefault=True)
    level_iters = traits.List(traits.Int, [100, 20], usedefault=True)
    factors = traits.List(traits.Int, [2, 1], usedefault=True)
    sigmas = traits.List(traits.Float, [1.0, 0.0], usedefault=True)
    sampling = traits.Range(low=0.0, high=1.0, value=0.25, exclude_low=True, usedefault=True,
                            desc="share of voxels sampled by the MI metric (1: dense)")
    min_samples = traits.Int(40000, usedefault=True, desc="fewest MI sample points (full resolution)")
    head_margin = traits.Int(3, usedefault=True, desc="MI samples only in the reference head grown by this "
                             "many voxels; -1: the whole head box")
    rounds = traits.Int(2, usedefault=True, desc="predict-then-register rounds")
    eddy = traits.Bool(True, usedefault=True, desc="affine eddy stage along the phase-encoding axis")
    eddy_model = traits.Enum(*EDDY_MODELS, usedefault=True,
                             desc="eddy scale/shears per shell linear in the gradient (FSL eddy --slm linear)")
    phase_encoding = traits.Str("", usedefault=True, desc="BIDS PhaseEncodingDirection (i, j, k, with -)")
    slice_axis = traits.Int(2, usedefault=True)
    outliers = traits.Enum("replace", "keep", "drop-volume", usedefault=True)
    outlier_z = traits.Float(4.0, usedefault=True)
    fd_radius = traits.Float(50.0, usedefault=True, desc="head radius (mm) of the framewise displacement")
    enabled = traits.Bool(True, usedefault=True, desc="False: pass the data through unchanged")
    in_undenoised = File(exists=True, desc="the series before the cross-volume denoising: moved volumes are "
                                           "registered with their copies from it (motion.correct_motion)")
    undenoised_gibbs = traits.Bool(False, usedefault=True, desc="unring those copies (as in_file was)")
    gibbs_slice_axis = traits.Int(2, usedefault=True)
    gibbs_n_points = traits.Int(3, usedefault=True)


class _MotionOutput(_TimedOut):
    out_file = File(exists=True)
    out_bval = File(exists=True)
    out_bvec = File(exists=True, desc="b-vectors rotated by each volume's rigid motion")
    out_params = File(exists=True, desc="TSV, one row per input volume: trans_x..rot_z, framewise_displacement, "
                                        "dropout_slices, resampled")
    out_matrices = File(exists=True, desc="JSON: Matrices, EddyMatrices (4x4 world), DropoutSlices, ...")


#: the voxel axis of a BIDS PhaseEncodingDirection
PE_AXES = {"i": 0, "i-": 0, "j": 1, "j-": 1, "k": 2, "k-": 2}


def motion_eddy_axis(enabled: bool, phase_encoding: str):
    """The voxel axis of the eddy stage (None: no eddy stage); a one-line DataError when the stage
    is on and the phase-encoding direction is missing or not a BIDS value."""
    from ..errors import DataError

    if not enabled:
        return None
    if phase_encoding not in PE_AXES:
        raise DataError(f"eddy-current correction needs the DWI's PhaseEncodingDirection (i, j, k, i-, j-, k-; got "
                        f"{phase_encoding or 'none'}): add it to the dwi.json sidecar (or a dataset-level dwi.json) "
                        "or set preproc.motion_eddy: false in the pipeline")
    return PE_AXES[phase_encoding]


class MotionCorrect(_Timed):
    """Motion + eddy correction (``bids_adhd.dmri.motion.correct_motion``): each volume registered to
    its leave-one-out prediction, dropout slices handled, b-vectors rotated by the rigid part."""

    input_spec, output_spec = _MotionInput, _MotionOutput

    def _compute(self):
        from ..dmri.motion import IDENTITY_MM, correct_motion

        data, img = _load(self.inputs.in_file)
        bvals, bvecs = _read_fsl(self.inputs.in_bval, self.inputs.in_bvec)
        i = self.inputs
        if i.enabled:
            res = correct_motion(data, img.affine, bvals, bvecs, b0_threshold=i.b0_threshold,
                                 level_iters=tuple(i.level_iters), factors=tuple(i.factors), sigmas=tuple(i.sigmas),
                                 sampling=i.sampling, min_samples=i.min_samples, nprocs=i.nthreads, rounds=i.rounds,
                                 eddy_axis=motion_eddy_axis(i.eddy, i.phase_encoding), slice_axis=i.slice_axis,
                                 outliers=i.outliers, outlier_z=i.outlier_z, fd_radius=i.fd_radius,
                                 head_margin=None if i.head_margin < 0 else i.head_margin, eddy_model=i.eddy_model,
                                 undenoised=_undenoised_reader(i))
        else:
            res = _no_motion(data, bvecs, i.slice_axis)
        kept = res["kept"]
        self._results["out_file"] = _save(res["data"], img, "dwi_mc.nii")
        self._results["out_bval"], self._results["out_bvec"] = _write_fsl(bvals[kept], res["bvecs"], "dwi_mc")
        self._results["out_params"] = _write_motion_tsv(res)
        self._results["out_matrices"] = os.path.abspath("motion.json")
        with open(self._results["out_matrices"], "w") as fh:
            json.dump({"Matrices": np.round(res["motion_affines"], 8).tolist(),
                       "EddyMatrices": np.round(res["eddy_affines"], 8).tolist() if i.enabled and i.eddy else None,
                       "DropoutSlices": [[int(v), int(k)] for v, k in np.argwhere(res["dropouts"])],
                       "SliceAxis": int(i.slice_axis), "KeptVolumes": [int(k) for k in kept],
                       "Rounds": int(res.get("rounds", 0)), "FDRadiusMm": float(i.fd_radius),
                       "IdentityToleranceMm": IDENTITY_MM}, fh)


def _undenoised_reader(inputs):
    """``k -> volume k`` of ``in_undenoised`` (unrung when ``undenoised_gibbs``), read on demand: only
    the moved volumes are asked for, and the series is not held in memory. None when unset."""
    if not isdefined(inputs.in_undenoised):
        return None
    import nibabel as nib

    proxy = nib.load(inputs.in_undenoised).dataobj

    def read(k):
        vol = np.asarray(proxy[..., k], np.float32)
        if inputs.undenoised_gibbs:
            from ..dmri.gibbs import unring

            vol = unring(vol, slice_axis=inputs.gibbs_slice_axis, n_points=inputs.gibbs_n_points, nprocs=1)
        return vol

    return read


def _no_motion(data, bvecs, slice_axis):
    """``preproc.motion: false``: the data unchanged, identity transforms."""
    n = data.shape[3]
    eye = np.repeat(np.eye(4)[None], n, 0)
    return dict(data=data, bvecs=bvecs, kept=np.arange(n), affines=eye, motion_affines=eye, eddy_affines=eye,
                params=np.zeros((n, 6)), fd=np.zeros(n), dropouts=np.zeros((n, data.shape[slice_axis]), bool),
                resampled=np.zeros(n, bool), rounds=0)


def _write_motion_tsv(res) -> str:
    path = os.path.abspath("motion.tsv")
    cols = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "framewise_displacement",
            "dropout_slices", "resampled"]
    table = np.column_stack([res["params"], res["fd"], res["dropouts"].sum(1), res["resampled"].astype(int)])
    np.savetxt(path, table, delimiter="\t", header="\t".join(cols), comments="", fmt="%.6g")
    return path


# --- tensor ----------------------------------------------------------------------

class _DTIInput(_Common):
    in_file = File(exists=True, mandatory=True)
    in_bval = File(exists=True, mandatory=True)
    in_bvec = File(exists=True, mandatory=True)
    in_mask = File(exists=True, mandatory=True)
    method = traits.Enum("WLS", "OLS", "NLLS", "RESTORE", usedefault=True)
    bmax = traits.Float(1500.0, usedefault=True)
    b0_threshold = traits.Float(50.0, usedefault=True)


class _DTIOutput(_TimedOut):
    out_fa = File(exists=True)
    out_md = File(exists=True)
    out_ad = File(exists=True)
    out_rd = File(exists=True)
    out_tensor = File(exists=True)
    out_v1 = File(exists=True, desc="principal eigenvector (for colour FA)")


class FitDTI(_Timed):
    """DIPY TensorModel on shells ≤ bmax → FA, MD, AD, RD, tensor, V1."""

    input_spec, output_spec = _DTIInput, _DTIOutput

    def _compute(self):
        from ..dmri.dti import fit_dti

        data, img = _load(self.inputs.in_file)
        bvals, bvecs = _read_fsl(self.inputs.in_bval, self.inputs.in_bvec)
        mask = _load(self.inputs.in_mask)[0] > 0
        res = fit_dti(data, bvals, bvecs, mask=mask, method=self.inputs.method, bmax=self.inputs.bmax,
                      b0_threshold=self.inputs.b0_threshold)
        for key in ("fa", "md", "ad", "rd", "tensor"):
            self._results[f"out_{key}"] = _save(res[key], img, f"{key}.nii")
        v1 = res["evecs"][..., :, 0] if "evecs" in res else res["v1"]
        self._results["out_v1"] = _save(v1, img, "v1.nii")


# --- template space --------------------------------------------------------------

class _TemplateInput(_Common):
    in_fa = File(exists=True, mandatory=True)
    in_md = File(exists=True, mandatory=True)
    in_mask = File(exists=True, mandatory=True)
    template = traits.Dict(mandatory=True, desc="TemplateConfig as a dict")


class _TemplateOutput(_TimedOut):
    out_xfm = File(exists=True, desc="ITK affine text file, dwi → template")
    out_fa = File(exists=True)
    out_md = File(exists=True)
    out_mask = File(exists=True)
    similarity = traits.Float()


class RegisterTemplate(_Timed):
    """FA → MNI152NLin2009aSym (DIPY MI affine [+ SyN]); FA, MD, mask onto the fixed grid."""

    input_spec, output_spec = _TemplateInput, _TemplateOutput

    def _compute(self):
        import nibabel as nib

        from .. import derivatives as dv
        from ..config import section_from_dict
        from ..dmri import template as tpl

        cfg = section_from_dict("template", self.inputs.template)
        fa, img = _load(self.inputs.in_fa)
        md = _load(self.inputs.in_md)[0]
        mask = _load(self.inputs.in_mask)[0] > 0
        reg = tpl.register_to_template(fa, img.affine, mask=mask, cfg=cfg)
        out = {}
        for key, arr, order in (("fa", fa, 1), ("md", md, 1), ("mask", mask.astype(np.float32), 0)):
            data, grid_affine = tpl.to_template(arr, img.affine, reg, cfg, order=order)
            dtype = np.uint8 if key == "mask" else np.float32
            ref = nib.Nifti1Image(np.zeros((1, 1, 1)), grid_affine)
            out[key] = _save(data > 0.5 if key == "mask" else data, ref, f"std_{key}.nii", dtype)
        self._results.update(out_fa=out["fa"], out_md=out["md"], out_mask=out["mask"],
                             similarity=float(reg["similarity"]))
        xfm = os.path.abspath("xfm.txt")
        dv.write_text(xfm, tpl.itk_affine_text(reg["affine"]))
        self._results["out_xfm"] = xfm


"""Nipype interfaces that write BIDS-Derivatives (through ``bids_adhd.derivatives``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from nipype.interfaces.base import (BaseInterfaceInputSpec, File, InputMultiObject, SimpleInterface,
                                    TraitedSpec, isdefined, traits)


class _RunSinkInput(BaseInterfaceInputSpec):
    out_root = traits.Str(mandatory=True)
    source = traits.Dict(mandatory=True, desc="derivatives.Source entities")
    raw_dwi = traits.Str(mandatory=True, desc="the raw DWI path (for Sources)")
    metadata = traits.Dict(desc="the raw DWI's BIDS metadata with inheritance (DwiRun.metadata, from the "
                                "BIDS index): a dataset-root dwi.json reaches the output sidecar")
    bids_dir = traits.Str(mandatory=True)
    config = traits.Dict(mandatory=True, desc="resolved PipelineConfig.to_dict()")
    dwi = File(exists=True, mandatory=True)
    bval = File(exists=True, mandatory=True)
    bvec = File(exists=True, mandatory=True)
    mask = File(exists=True, mandatory=True)
    b0 = File(exists=True, mandatory=True)
    motion = File(exists=True, mandatory=True)
    motion_matrices = File(exists=True, mandatory=True, desc="JSON of the motion step (Matrices, EddyMatrices, ...)")
    fa = File(exists=True, mandatory=True)
    md = File(exists=True, mandatory=True)
    ad = File(exists=True, mandatory=True)
    rd = File(exists=True, mandatory=True)
    tensor = File(exists=True, mandatory=True)
    v1 = File(exists=True, mandatory=True)
    noise_sigma = traits.Float()
    std_fa = File(exists=True, mandatory=True)
    std_md = File(exists=True, mandatory=True)
    std_mask = File(exists=True, mandatory=True)
    xfm = File(exists=True, mandatory=True)
    similarity = traits.Float(mandatory=True)


class _RunSinkOutput(TraitedSpec):
    summary = traits.Dict(desc="paths and QC numbers of this run (for the subject report)")


class RunDerivatives(SimpleInterface):
    """Copy one run's results into OUTPUT_DIR under their BIDS names, with sidecars and QC JSON."""

    input_spec, output_spec = _RunSinkInput, _RunSinkOutput

    def _run_interface(self, runtime):
        from .. import derivatives as dv
        from .. import __version__
        from ..qc import qc_metrics

        i = self.inputs
        root = Path(i.out_root)
        src = dv.Source(**i.source)
        raw_rel = Path(i.raw_dwi).resolve().relative_to(Path(i.bids_dir).resolve()).as_posix()
        raw_uri = f"bids:raw:{raw_rel}"
        pre = i.config["preproc"]
        tpl = i.config["template"]
        soft = {"Name": "bids_adhd", "Version": __version__}

        dv.copy_nifti(i.dwi, dv.preproc_dwi(root, src))
        dv.copy_file(i.bval, dv.preproc_dwi(root, src, ".bval"))
        dv.copy_file(i.bvec, dv.preproc_dwi(root, src, ".bvec"))
        raw_meta = dict(i.metadata) if isdefined(i.metadata) else {}
        dv.write_json(dv.preproc_dwi(root, src, ".json"), {
            **raw_meta, "Sources": [raw_uri], "SkullStripped": False,
            "Denoising": {"Method": pre["denoise"], "PatchRadius": pre["denoise_patch_radius"],
                          "PatchStride": pre["denoise_stride"]},
            "GibbsCorrection": bool(pre["gibbs"]),
            "MotionCorrection": _motion_description(pre),
            "GeneratedBy": soft})
        dv.copy_nifti(i.mask, dv.brain_mask(root, src))

        table = np.loadtxt(i.motion, skiprows=1, delimiter="\t", ndmin=2)
        mats = json.loads(Path(i.motion_matrices).read_text())
        _write_confounds(dv, root, src, table, mats, pre)
        units = {"fa": "arbitrary", "md": "mm^2/s", "ad": "mm^2/s", "rd": "mm^2/s", "tensor": "mm^2/s"}
        desc = {"fa": "fractional anisotropy", "md": "mean diffusivity", "ad": "axial diffusivity",
                "rd": "radial diffusivity",
                "tensor": "diffusion tensor, 6 volumes in DIPY lower-triangular order Dxx, Dxy, Dyy, Dxz, Dyz, Dzz"}
        for p in ("fa", "md", "ad", "rd", "tensor"):
            dv.copy_nifti(getattr(i, p), dv.dwimap(root, src, p))
            dv.write_json(dv.dwimap(root, src, p, ext=".json"), {
                "Description": desc[p], "Units": units[p], "Model": "tensor", "FitMethod": pre["dti_fit"],
                "MaxBValue": pre["dti_bmax"], "Sources": [raw_uri], "GeneratedBy": soft})
        space = dv.TEMPLATE_SPACE
        for p, f in (("fa", i.std_fa), ("md", i.std_md)):
            dv.copy_nifti(f, dv.dwimap(root, src, p, space=space))
            dv.write_json(dv.dwimap(root, src, p, space=space, ext=".json"), {
                "Description": f"{desc[p]} resampled to {space}", "Units": units[p], "Model": "tensor",
                "SpatialReference": {"Space": space, "ResolutionMM": tpl["resolution_mm"],
                                     "Shape": list(tpl["shape"])},
                "Registration": "DIPY mutual-information affine" + (" + SyN" if tpl["syn"] else ""),
                "Sources": [raw_uri], "GeneratedBy": soft})
        dv.copy_nifti(i.std_mask, dv.brain_mask(root, src, space=space))
        dv.copy_file(i.xfm, dv.xfm(root, src))

        import nibabel as nib

        b0_img = nib.load(i.b0)
        mask = np.asarray(nib.load(i.mask).dataobj) > 0
        qc = qc_metrics(mean_b0=b0_img.get_fdata(dtype=np.float32), mask=mask,
                        fa=nib.load(i.fa).get_fdata(dtype=np.float32), md=nib.load(i.md).get_fdata(dtype=np.float32),
                        params=table[:, :6], fd=table[:, 6], fd_outlier_mm=pre["fd_outlier_mm"],
                        voxel_size=b0_img.header.get_zooms()[:3], reg_similarity=i.similarity,
                        noise_sigma=i.noise_sigma if isdefined(i.noise_sigma) else None,
                        fd_radius_mm=pre["fd_radius_mm"], dropout_slices=mats.get("DropoutSlices"),
                        resampled=table[:, 8] if table.shape[1] > 8 else None)
        dv.write_json(dv.qc_json(root, src), {**qc, "Sources": [raw_uri]})
        self._results["summary"] = {
            "source": dict(i.source), "label": src.prefix, "qc": qc,
            "files": {"b0": i.b0, "mask": i.mask, "fa": i.fa, "md": i.md, "v1": i.v1, "motion": i.motion,
                      "std_fa": i.std_fa, "std_mask": i.std_mask}}
        return runtime


def _motion_description(pre: dict) -> str:
    if not pre["motion"]:
        return "none"
    return ("each volume registered to its leave-one-out tensor prediction (b0s to the mean b0), DIPY "
            f"mutual information, rigid{' + affine eddy stage along the phase-encoding axis' if pre['motion_eddy'] else ''}"
            f", {pre['motion_rounds']} round(s); one resampling per volume (none at identity); b-vectors rotated "
            f"by the rigid part; slice dropouts: {pre['motion_outliers']}")


_CONFOUND_COLS = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "framewise_displacement",
                  "dropout_slices", "resampled"]


def _write_confounds(dv, root, src, table, mats: dict, pre: dict) -> None:
    """The confounds TSV (one row per input volume) and its sidecar with the transforms."""
    cols = _CONFOUND_COLS[:table.shape[1]]
    data = {c: [float(v) for v in table[:, k]] for k, c in enumerate(cols)}
    for c in ("dropout_slices", "resampled"):
        if c in data:
            data[c] = [int(v) for v in data[c]]
    data["motion_outlier"] = [int(v > pre["fd_outlier_mm"]) for v in table[:, 6]]
    dv.write_tsv(dv.confounds(root, src), data)
    side = {c: {"Description": f"{'translation' if c.startswith('trans') else 'rotation'} along/about {c[-1]} of "
                "the rigid head motion (reference: the first b0; translation of the image centre)",
                "Units": "mm" if c.startswith("trans") else "rad"} for c in cols[:6]}
    side.update({
        "framewise_displacement": {"Description": "Power et al. (2012) framewise displacement of the rigid motion, "
                                   f"rotations converted on a {mats.get('FDRadiusMm', pre['fd_radius_mm'])} mm "
                                   "sphere", "Units": "mm"},
        "dropout_slices": {"Description": "slices of this volume detected as signal dropouts (model residuals; "
                           f"action: {pre['motion_outliers']})"},
        "resampled": {"Description": "1: the volume was resampled once with its composed transform; 0: its "
                      f"transform is the identity within {mats.get('IdentityToleranceMm')} mm on the head box (no head-box "
                      "corner moved further) and it was not resampled"},
        "motion_outlier": {"Description": f"1: framewise_displacement above {pre['fd_outlier_mm']} mm"},
        "Matrices": mats.get("Matrices"), "EddyMatrices": mats.get("EddyMatrices"),
        "MatricesDescription": "per input volume, 4x4 world (mm) matrices mapping a point in the reference (first "
                               "b0) to the same anatomy in that volume: Matrices = rigid head motion (the convention "
                               "of the simulator's truth desc-motion_timeseries.json), EddyMatrices = eddy-current "
                               "distortion in the volume's frame (null when not estimated); the whole map is "
                               "EddyMatrices @ Matrices",
        "DropoutSlices": mats.get("DropoutSlices"), "SliceAxis": mats.get("SliceAxis"),
        "KeptVolumes": mats.get("KeptVolumes")})
    dv.write_json(dv.confounds(root, src, ".json"), side)


class _ReportInput(BaseInterfaceInputSpec):
    out_root = traits.Str(mandatory=True)
    subject = traits.Str(mandatory=True)
    summaries = InputMultiObject(traits.Dict, mandatory=True)
    config_hash = traits.Str(mandatory=True)


class _ReportOutput(TraitedSpec):
    out_report = File(exists=True)


class SubjectReport(SimpleInterface):
    """One HTML QC report per subject; then the 'done' stamps of its runs."""

    input_spec, output_spec = _ReportInput, _ReportOutput

    def _run_interface(self, runtime):
        from .. import derivatives as dv
        from ..reports.participant import report_run_from_files, write_report

        root = Path(self.inputs.out_root)
        runs = [report_run_from_files(s) for s in self.inputs.summaries]
        self._results["out_report"] = str(write_report(root, self.inputs.subject, runs))
        for s in self.inputs.summaries:
            src = dv.Source(**s["source"])
            dv.write_json(dv.done_stamp(root, src), {"config_hash": self.inputs.config_hash})
        return runtime

"""The participant-level workflow: every selected run of every selected subject."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

from nipype.interfaces.utility import IdentityInterface, Merge
from nipype.pipeline import engine as pe

from ..bids import DwiRun
from ..config import PipelineConfig
from ..interfaces.bids import RunDerivatives, SubjectReport
from .dwi import init_dwi_preproc_wf, init_template_wf


def init_participant_wf(runs: list[DwiRun], cfg: PipelineConfig, bids_dir: Path, out_root: Path,
                        work_dir: Path, config_hash: str, nthreads: int = 1,
                        name: str = "bids_adhd_participant_wf") -> pe.Workflow:
    """One ``dwi_preproc_wf`` + ``template_wf`` + derivatives sink per run, one report per subject.

    Inputs: none (the runs are fixed at build time).
    Outputs: the files under ``out_root`` (see ``bids_adhd.derivatives``).
    """
    wf = pe.Workflow(name=name, base_dir=str(work_dir))
    by_subject = defaultdict(list)
    for run in runs:
        by_subject[run.source.subject].append(run)
    cfg_dict = cfg.to_dict()
    for subject, sub_runs in sorted(by_subject.items()):
        merge = pe.Node(Merge(len(sub_runs)), name=f"merge_sub{subject}")
        report = pe.Node(SubjectReport(out_root=str(out_root), subject=subject, config_hash=config_hash),
                         name=f"report_sub{subject}", overwrite=True)
        for k, run in enumerate(sub_runs, start=1):
            key = run.source.key
            src = pe.Node(IdentityInterface(["dwi_file", "bval_file", "bvec_file"]), name=f"src_{key}")
            src.inputs.dwi_file, src.inputs.bval_file, src.inputs.bvec_file = str(run.dwi), str(run.bval), str(run.bvec)
            pre = init_dwi_preproc_wf(cfg.preproc, nthreads=nthreads, name=f"dwi_preproc_{key}",
                                      phase_encoding=(run.metadata or {}).get("PhaseEncodingDirection"))
            tpl = init_template_wf(cfg.template, nthreads=nthreads, name=f"template_{key}")
            sink = pe.Node(RunDerivatives(out_root=str(out_root), source=dataclasses.asdict(run.source),
                                          raw_dwi=str(run.dwi), bids_dir=str(bids_dir), config=cfg_dict),
                           name=f"sink_{key}", overwrite=True)  # writes outside the work dir: always run
            wf.connect([
                (src, pre, [("dwi_file", "inputnode.dwi_file"), ("bval_file", "inputnode.bval_file"),
                            ("bvec_file", "inputnode.bvec_file")]),
                (pre, tpl, [("outputnode.fa", "inputnode.fa"), ("outputnode.md", "inputnode.md"),
                            ("outputnode.mask", "inputnode.mask")]),
                (pre, sink, [(f"outputnode.{f}", f) for f in ("dwi", "bval", "bvec", "mask", "b0", "motion",
                                                              "motion_matrices", "fa",
                                                              "md", "ad", "rd", "tensor", "v1", "noise_sigma")]),
                (tpl, sink, [("outputnode.xfm", "xfm"), ("outputnode.std_fa", "std_fa"),
                             ("outputnode.std_md", "std_md"), ("outputnode.std_mask", "std_mask"),
                             ("outputnode.similarity", "similarity")]),
                (sink, merge, [("summary", f"in{k}")]),
            ])
        wf.connect(merge, "out", report, "summaries")
    return wf

"""The participant-level workflow: one ``single_subject_<label>_wf`` per selected subject."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

from nipype.interfaces.utility import IdentityInterface, Merge
from nipype.pipeline import engine as pe

from .. import derivatives as dv
from ..bids import DwiRun
from ..config import PipelineConfig
from ..interfaces.bids import RunDerivatives, SubjectReport
from .dwi import init_dwi_preproc_wf, init_template_wf


def init_participant_wf(runs: list[DwiRun], cfg: PipelineConfig, bids_dir: Path, out_root: Path,
                        work_dir: Path, config_hash: str, nthreads: int = 1, run_id: str | None = None,
                        name: str = "bids_adhd_participant_wf") -> pe.Workflow:
    """One ``init_single_subject_wf`` per subject of ``runs``.

    Inputs: none (the runs are fixed at build time).
    Outputs: the files under ``out_root`` (see ``bids_adhd.derivatives``); with ``run_id``, each
    subject's crash files go to ``sub-<label>/log/<run_id>/``.
    """
    wf = pe.Workflow(name=name, base_dir=str(work_dir))
    by_subject = defaultdict(list)
    for run in runs:
        by_subject[run.source.subject].append(run)
    for subject, sub_runs in sorted(by_subject.items()):
        crash_dir = dv.log_dir(out_root, subject, run_id) if run_id else None
        wf.add_nodes([init_single_subject_wf(subject, sub_runs, cfg, bids_dir, out_root, config_hash,
                                             nthreads=nthreads, crash_dir=crash_dir)])
    return wf


def init_single_subject_wf(subject: str, runs: list[DwiRun], cfg: PipelineConfig, bids_dir: Path,
                           out_root: Path, config_hash: str, nthreads: int = 1, crash_dir: Path | None = None,
                           name: str | None = None) -> pe.Workflow:
    """One subject: per run ``dwi_preproc_wf`` + ``template_wf`` + derivatives sink, then its report.

    Inputs: none (the runs are fixed at build time).
    Outputs: the subject's files under ``out_root``; ``crash_dir`` (its ``log/<run-id>/``) receives
    the crash file of any node that fails.
    """
    wf = pe.Workflow(name=name or f"single_subject_{subject}_wf")
    cfg_dict = cfg.to_dict()
    merge = pe.Node(Merge(len(runs)), name=f"merge_sub{subject}")
    report = pe.Node(SubjectReport(out_root=str(out_root), subject=subject, config_hash=config_hash),
                     name=f"report_sub{subject}", overwrite=True)
    for k, run in enumerate(runs, start=1):
        key = run.source.key
        src = pe.Node(IdentityInterface(["dwi_file", "bval_file", "bvec_file"]), name=f"src_{key}")
        src.inputs.dwi_file, src.inputs.bval_file, src.inputs.bvec_file = str(run.dwi), str(run.bval), str(run.bvec)
        pre = init_dwi_preproc_wf(cfg.preproc, nthreads=nthreads, name=f"dwi_preproc_{key}",
                                  phase_encoding=(run.metadata or {}).get("PhaseEncodingDirection"))
        tpl = init_template_wf(cfg.template, nthreads=nthreads, name=f"template_{key}")
        sink = pe.Node(RunDerivatives(out_root=str(out_root), source=dataclasses.asdict(run.source),
                                      raw_dwi=str(run.dwi), metadata=dict(run.metadata), bids_dir=str(bids_dir),
                                      config=cfg_dict),
                       name=f"sink_{key}", overwrite=True)  # writes outside the work dir: always run
        wf.connect([
            (src, pre, [("dwi_file", "inputnode.dwi_file"), ("bval_file", "inputnode.bval_file"),
                        ("bvec_file", "inputnode.bvec_file")]),
            (pre, tpl, [("outputnode.fa", "inputnode.fa"), ("outputnode.md", "inputnode.md"),
                        ("outputnode.mask", "inputnode.mask")]),
            (pre, sink, [(f"outputnode.{f}", f) for f in ("dwi", "bval", "bvec", "mask", "b0", "motion",
                                                          "motion_matrices", "fa", "md", "ad", "rd", "tensor", "v1", "noise_sigma")]),
            (tpl, sink, [("outputnode.xfm", "xfm"), ("outputnode.std_fa", "std_fa"),
                         ("outputnode.std_md", "std_md"), ("outputnode.std_mask", "std_mask"),
                         ("outputnode.similarity", "similarity")]),
            (sink, merge, [("summary", f"in{k}")]),
        ])
    wf.connect(merge, "out", report, "summaries")
    if crash_dir is not None:
        _set_crash_dir(wf, Path(crash_dir))
    return wf


def _set_crash_dir(wf: pe.Workflow, crash_dir: Path) -> None:
    """Every node of ``wf`` writes its crash file to ``crash_dir`` (a node's own config wins over the
    top workflow's when Nipype runs it)."""
    for node_name in wf.list_node_names():
        node = wf.get_node(node_name)
        node.config = dict(node.config or {})
        node.config["execution"] = {**node.config.get("execution", {}), "crashdump_dir": str(crash_dir)}

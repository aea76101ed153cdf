"""``bids_adhd BIDS_DIR OUTPUT_DIR participant``: checks, selection, workflow, timings."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path

from .. import __version__
from .. import derivatives as dv
from ..bids import (check_bids_dir, check_output_dir, check_run, check_writable, collect_runs,
                    ensure_writable_dir, participants_warnings, run_validator, select_subjects)
from ..config import load_pipeline
from .. import errors
from ..errors import BidsAppError, DataError, OutputError, UsageError
from ..settings import ParticipantSettings

LOG = logging.getLogger("bids_adhd.participant")
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def config_hash(cfg_dict: dict) -> str:
    blob = json.dumps({"version": __version__, "config": {k: v for k, v in cfg_dict.items()
                                                          if k in ("preproc", "template")}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_done(out_root: Path, run, chash: str) -> bool:
    stamp = dv.done_stamp(out_root, run.source)
    if not stamp.is_file():
        return False
    try:
        if json.loads(stamp.read_text()).get("config_hash") != chash:
            return False
    except ValueError:
        return False
    return all(p.is_file() for p in dv.participant_outputs(out_root, run.source))


class _StepTimer:
    """Nipype status callback: logs each node's wall time as it finishes."""

    def __init__(self):
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}

    def __call__(self, node, status):
        name = node.fullname
        if status == "start":
            self.started[name] = time.perf_counter()
        elif status in ("end", "exception") and name in self.started:
            sec = time.perf_counter() - self.started.pop(name)
            self.seconds[name] = sec
            if not name.split(".")[-1] in ("inputnode", "outputnode") and not name.split(".")[-1].startswith("src_"):
                LOG.info("%-60s %s in %.1f s", name.replace("bids_adhd_participant_wf.", ""),
                         "done" if status == "end" else "FAILED", sec)


def run_participant(settings: ParticipantSettings) -> int:
    """The participant level of ``settings`` (built by ``cli.py``, validated on construction)."""
    t0 = time.perf_counter()
    s = settings
    bids_dir = check_bids_dir(s.bids_dir)
    out_root = check_output_dir(s.output_dir, bids_dir)
    if s.work_dir:
        work = Path(s.work_dir).expanduser().resolve()
        if work == bids_dir or bids_dir in work.parents:
            raise UsageError(f"--work-dir {s.work_dir} is inside BIDS_DIR; the input dataset stays read only")
        check_writable(work, "--work-dir")
    cfg = load_pipeline(s.pipeline)
    if not s.skip_bids_validation:   # the selected subjects and the top-level files only
        run_validator(bids_dir, select_subjects(bids_dir, s.participant_label))
    runs = collect_runs(bids_dir, s.participant_label, s.session_label, s.bids_filter_file)
    for warning in participants_warnings(bids_dir):
        LOG.warning(warning)
    if out_root.is_dir():  # a killed run's hidden temporaries of the selected runs
        for tmp in dv.remove_stale_temps(out_root, [r.source for r in runs]):
            LOG.info("removed %s, left by an interrupted run", tmp)
    chash = config_hash(cfg.to_json_dict())
    todo = [r for r in runs if not is_done(out_root, r, chash)]
    for r in runs:
        if r not in todo:
            LOG.info("%s: already finished with this configuration; nothing to do", r.source.prefix)
    if todo:
        LOG.info("checking %d DWI series", len(todo))
        for r in todo:
            summary = check_run(r, cfg.preproc.b0_threshold)
            LOG.info("%s: %s volumes, %d b0, shells %s, voxels %s mm", r.source.prefix, summary["shape"],
                     summary["n_b0"], summary["shells"], tuple(round(z, 2) for z in summary["zooms"]))
        with _env_restored(_THREAD_VARS):
            _run_workflow(s, cfg, bids_dir, out_root, todo, chash)
    LOG.info("participant level finished in %.1f s; outputs in %s", time.perf_counter() - t0, out_root)
    return 0


@contextlib.contextmanager
def _env_restored(names):
    """Restore the environment variables ``names`` afterwards: the run sets the BLAS/OpenMP thread
    counts for its node processes, and an in-process caller must not keep them (a later torchrun
    started from that process took them as its ranks' thread counts)."""
    old = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _configure_nipype(work_dir: Path, verbose: int) -> None:
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    nipype_config.update_config({
        "execution": {"crashdump_dir": str(work_dir / "crash"), "crashfile_format": "txt",
                      "check_version": "false",  # no etelemetry request (no network at run time)
                      "poll_sleep_duration": 0.05, "stop_on_first_crash": "true",
                      "remove_unnecessary_outputs": "false", "hash_method": "content",
                      "create_report": "false", "write_provenance": "false"},
        "monitoring": {"enabled": "false"}})
    # Nipype logs every node failure with its traceback at ERROR; a user error is reported as one
    # line (the crash file keeps the details), so Nipype speaks only with -v.
    level = "CRITICAL" if verbose == 0 else ("WARNING" if verbose == 1 else "INFO")
    nipype_config.set("logging", "workflow_level", level)
    nipype_config.set("logging", "interface_level", level)
    nipype_logging.update_logging(nipype_config)


def _run_workflow(settings: ParticipantSettings, cfg, bids_dir, out_root, runs, chash) -> None:
    from .participant import init_participant_wf

    nprocs = settings.nprocs or os.cpu_count() or 1
    nthreads = settings.omp_nthreads or max(1, nprocs // max(1, len(runs)))
    nthreads = min(nthreads, nprocs)
    for var in _THREAD_VARS:
        os.environ[var] = str(nthreads)
    ensure_writable_dir(out_root, "OUTPUT_DIR")
    dv.ensure_dataset_description(out_root, bids_dir)
    dv.ensure_bidsignore(out_root)
    work_dir = ensure_writable_dir(Path(settings.work_dir).expanduser().resolve() if settings.work_dir
                                   else out_root / ".bids_adhd_work", "--work-dir")
    _configure_nipype(work_dir, settings.verbose)
    run_id = new_run_id()
    subjects = sorted({r.source.subject for r in runs})
    for subject in subjects:
        write_pipeline_yaml(out_root, subject, run_id, cfg)
    wf = init_participant_wf(runs, cfg, bids_dir, out_root, work_dir, chash, nthreads=nthreads, run_id=run_id)
    timer = _StepTimer()
    LOG.info("running %d series with %s (%d processes, %d threads per node); work dir %s",
             len(runs), settings.nipype_plugin, nprocs, nthreads, work_dir)
    plugin_args = {"status_callback": timer}
    slurm_tag = None
    if settings.nipype_plugin == "MultiProc":
        plugin_args.update(n_procs=nprocs, raise_insufficient=False)
    elif settings.nipype_plugin == "SLURMGraph":
        from .slurm import slurm_plugin_args
        # graph plugins ignore status_callback (and warn if given); they need sbatch_args
        slurm_tag, plugin_args = slurm_plugin_args(nthreads)
    logs = [dv.log_dir(out_root, s, run_id) for s in subjects]
    error = None
    try:
        wf.run(plugin=settings.nipype_plugin, plugin_args=plugin_args)
        if slurm_tag is not None:
            from .slurm import wait_for_jobs
            wait_for_jobs(slurm_tag)  # SLURMGraph returns right after sbatch
            unfinished = [r.source.prefix for r in runs if not is_done(out_root, r, chash)]
            if unfinished:
                crash = _latest_crash(logs)
                error = _crash_error(crash) if crash else DataError(
                    f"Slurm jobs failed for {', '.join(unfinished)} "
                    f"(job logs: {work_dir}/**/batch/batchscript_*.sh.e)")
    except BidsAppError:
        raise
    except RuntimeError as exc:
        crash = _latest_crash(logs)
        error = _crash_error(crash) if crash else DataError(
            f"processing failed: {str(exc).splitlines()[0]} (details: {work_dir})")
    except OSError as exc:  # the engine itself could not write (work dir or log dir full, read only, ...)
        where = exc.filename or f"in the work dir {work_dir}"
        raise OutputError(f"cannot write {where}: {exc.strerror or exc}") from None
    if error is not None:
        if not isinstance(error, OutputError):  # OUTPUT_DIR writable: the crash goes into the report
            _report_crashes(out_root, subjects, run_id)
        raise error


def new_run_id() -> str:
    """``<UTC date>-<time>_<8 hex>``: names one participant run's ``log/<run-id>/`` folders."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}_{uuid.uuid4().hex[:8]}"


def write_pipeline_yaml(out_root: Path, subject: str, run_id: str, cfg) -> Path:
    """The resolved pipeline configuration, as YAML, in the subject's ``log/<run-id>/``."""
    import yaml

    resolved = cfg.to_json_dict()
    text = (f"# bids_adhd {__version__}: the resolved pipeline of participant run {run_id}\n"
            + yaml.safe_dump(resolved, sort_keys=False))
    return dv.write_text(dv.pipeline_yaml(out_root, subject, run_id), text)


def _latest_crash(folders) -> Path | None:
    """The newest crash file of this run (each subject's ``log/<run-id>/``), or None."""
    crashes = sorted((p for f in folders for p in dv.crash_files(f)), key=lambda p: (p.stat().st_mtime, p.name))
    return crashes[-1] if crashes else None


def _report_crashes(out_root: Path, subjects, run_id: str) -> None:
    """Each subject with crash files in this run gets a report that lists them (best effort)."""
    from ..reports.participant import write_report

    for subject in subjects:
        crashes = [dv.read_crash(p) for p in dv.crash_files(dv.log_dir(out_root, subject, run_id))]
        for c in crashes:
            c["file"] = Path(c["file"]).relative_to(out_root).as_posix()
        if crashes:
            try:
                write_report(out_root, subject, [], crashes)
            except (BidsAppError, OSError) as exc:
                LOG.warning("could not write the crash report of sub-%s: %s", subject, exc)


_USER_ERROR = re.compile(r"^bids_adhd\.errors\.(\w+): (.*)$")


def _crash_error(crash_file: Path) -> BidsAppError:
    """The user error behind a Nipype crash file, with its own exit code.

    An error from ``bids_adhd.errors`` raised inside a node keeps its class (a full
    output disk while the sink writes → ``OutputError``, exit 73); a full disk anywhere
    else is ``OutputError`` too; any other failure is ``DataError`` (65).
    """
    crash = dv.read_crash(crash_file)
    node, reason = crash["node"], crash["error"]
    details = f"(node {node}; details: {crash_file})"
    match = _USER_ERROR.match(reason)
    if match and isinstance(getattr(errors, match.group(1), None), type) \
            and issubclass(getattr(errors, match.group(1)), BidsAppError):
        return getattr(errors, match.group(1))(f"{match.group(2)} {details}")
    if "[Errno 28]" in reason or "No space left on device" in reason:
        return OutputError(f"no space left on a device while processing: {reason} {details}")
    return DataError(f"processing failed: {reason} {details}")

"""Command line: the BIDS-Apps interface plus a few tool subcommands.

``bids_adhd BIDS_DIR OUTPUT_DIR {participant,group} [options]`` is the BIDS App.
``bids_adhd simulate|model-info|fetch-model ...`` are tools. Each tool lives in
its own module, which provides ``add_cli_arguments(parser)`` and
``run_cli(args) -> int``; this module only parses and maps errors to exit codes.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from . import __version__
from .errors import BidsAppError, UsageError
from .settings import (CV_MODES, DEVICES, HARMONIZE_METHODS, NIPYPE_PLUGINS, GroupSettings,
                       ParticipantSettings, from_namespace)

LOG = logging.getLogger("bids_adhd")

# name -> (module, one-line help)
SUBCOMMANDS = {
    "simulate": ("bids_adhd.simulate_cli", "write a simulated BIDS dataset with a planted ADHD effect"),
    "model-info": ("bids_adhd.learn.info", "print the parameter report of a preset"),
    "fetch-model": ("bids_adhd.learn.foundation", "download foundation-model weights into the cache"),
}


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (exit 64) instead of printing and exiting 2."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _alias(*names: str) -> list[str]:
    """Both spellings: --participant-label and --participant_label."""
    out = []
    for n in names:
        out.append(n)
        if "-" in n[2:]:
            out.append("--" + n[2:].replace("-", "_"))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bids_adhd", description=(
        "Diffusion-MRI BIDS App: DIPY preprocessing and DTI maps (participant), "
        "LoRA-adapted CT-FM ADHD classifier with cross-validation (group)."),
        epilog="Tools: " + "; ".join(f"bids_adhd {k} --help: {v[1]}" for k, v in SUBCOMMANDS.items()))
    p.add_argument("bids_dir", help="the root of the BIDS dataset (read only)")
    p.add_argument("output_dir", help="where the derivatives go (created if missing)")
    p.add_argument("analysis_level", choices=["participant", "group"],
                   help="participant: preprocess each subject; group: train/evaluate the classifier")
    g = p.add_argument_group("selection")
    g.add_argument(*_alias("--participant-label"), nargs="+", dest="participant_label", default=None,
                   metavar="LABEL", help="subjects to process (with or without 'sub-'); default: all")
    g.add_argument(*_alias("--session-label"), nargs="+", dest="session_label", default=None,
                   metavar="LABEL", help="sessions to process (with or without 'ses-'); default: all")
    g.add_argument(*_alias("--bids-filter-file"), dest="bids_filter_file", default=None, metavar="FILE",
                   help="JSON of pybids filters for the 'dwi' query, e.g. {\"dwi\": {\"acquisition\": \"hardi\"}}")
    g.add_argument(*_alias("--skip-bids-validation"), dest="skip_bids_validation", action="store_true",
                   help="do not run the BIDS validator on the input")
    r = p.add_argument_group("resources")
    r.add_argument(*_alias("--work-dir"), dest="work_dir", default=None, metavar="DIR",
                   help="Nipype working directory (default: OUTPUT_DIR/.bids_adhd_work); reused on re-runs")
    r.add_argument(*_alias("--nprocs"), dest="nprocs", type=int, default=None, metavar="N",
                   help="processes for Nipype MultiProc (default: all cores)")
    r.add_argument(*_alias("--omp-nthreads"), dest="omp_nthreads", type=int, default=None, metavar="N",
                   help="threads inside one node (BLAS/OpenMP/torch); default: nprocs divided among the series")
    r.add_argument(*_alias("--nipype-plugin"), dest="nipype_plugin", default="MultiProc",
                   choices=NIPYPE_PLUGINS, help="Nipype execution plugin")
    c = p.add_argument_group("configuration")
    c.add_argument("--pipeline", default=None, metavar="NAME|PATH",
                   help="preset name from pipelines/ or a YAML file (default: 'default' for participant, "
                        "'paper' for group)")
    c.add_argument("--model", default=None, metavar="ADAPTER",
                   help="participant: apply a trained adapter (safetensors) and write a prediction")
    c.add_argument(*_alias("--allow-training-subjects"), dest="allow_training_subjects", action="store_true",
                   help="with --model: predict even subjects the model was trained on (leakage!)")
    c.add_argument("--weights", default=None, metavar="PATH",
                   help="foundation-model weights (safetensors); default: the cache / image location")
    gr = p.add_argument_group("group level")
    gr.add_argument(*_alias("--label-column"), dest="label_column", default="diagnosis",
                    help="participants.tsv (or --label-file) column with the diagnosis (default: diagnosis)")
    gr.add_argument("--positive", nargs="+", default=["ADHD"], metavar="VALUE",
                    help="values or shell-style patterns of the positive class, e.g. 'ADHD*' (default: ADHD)")
    gr.add_argument("--negative", nargs="+", default=None, metavar="VALUE",
                    help="values or patterns of the negative class, e.g. TD; subjects matching neither class "
                         "are excluded (default: every value not matching --positive)")
    gr.add_argument(*_alias("--label-file"), dest="label_file", default=None, metavar="TSV",
                    help="TSV with participant_id and the label column (e.g. phenotype/diagnosis.tsv), used "
                         "instead of participants.tsv for the labels; its covariates override participants.tsv's")
    gr.add_argument(*_alias("--qc-exclude"), dest="qc_exclude", nargs="+", default=None, metavar="EXPR",
                    help="exclude runs whose participant-level QC matches any rule, e.g. 'max_fd > 3' "
                         "'snr < 10' (metric names: docs/qc.md)")
    gr.add_argument("--folds", type=int, default=None, help="cross-validation folds (default: the preset's)")
    gr.add_argument("--seed", type=int, default=None, help="random seed (default: the preset's)")
    gr.add_argument("--device", default="auto", choices=DEVICES)
    gr.add_argument("--resume", action="store_true", help="continue a killed group run from its checkpoints")
    st = p.add_argument_group("group statistics (docs/group.md)")
    st.add_argument("--cv", default="stratified", choices=CV_MODES,
                    help="stratified k-fold (default) or leave-one-site-out (participants.tsv 'site')")
    st.add_argument("--permutations", type=int, default=None, metavar="N",
                    help="label permutations of the frozen-feature read-out (default 200; 0: no test)")
    st.add_argument("--confounds", nargs="+", default=None, metavar="COLUMN",
                    help="participants.tsv columns (and mean_fd) predicted alone and checked against the score "
                         "(default: age sex site mean_fd; none: skip)")
    st.add_argument("--harmonize", default="none", choices=HARMONIZE_METHODS,
                    help="combat: ComBat (site as batch, age/sex protected) of the permutation test's frozen "
                         "features, fitted on each training fold only (needs the harmonize extra)")
    st.add_argument(*_alias("--no-saliency"), dest="no_saliency", action="store_true",
                    help="skip the saliency maps")
    v = p.add_mutually_exclusive_group()
    v.add_argument("-v", "--verbose", action="count", default=0, help="more log output; tracebacks on error")
    v.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("--version", action="version", version=f"bids_adhd {__version__}")
    return p


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("bids_adhd")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _run_subcommand(name: str, argv: list[str]) -> int:
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = _Parser(prog=f"bids_adhd {name}", description=help_text)
    module.add_cli_arguments(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    return int(module.run_cli(args) or 0)


def participant_settings(args: argparse.Namespace) -> ParticipantSettings:
    """The participant level's settings from the parsed command line (validated on construction)."""
    return from_namespace(ParticipantSettings, args, pipeline=args.pipeline or "default",
                          verbose=int(args.verbose or 0))


def group_settings(args: argparse.Namespace) -> GroupSettings:
    """The group level's settings from the parsed command line (validated on construction)."""
    return from_namespace(GroupSettings, args, pipeline=args.pipeline or "paper", saliency=not args.no_saliency)


def _participant(settings: ParticipantSettings) -> int:
    """The participant workflow, then (``--model``) the prediction of the selected subjects.

    The prediction is dispatched here, after the workflow, so that the
    workflows do not call up into the learning code; the adapter file is checked
    before any processing."""
    from .workflows.run import run_participant

    if settings.model:
        from .learn.predict import check_model_file
        check_model_file(settings.model)
    code = int(run_participant(settings) or 0)
    if code == 0 and settings.model:
        from .learn.predict import predict_participants
        predict_participants(settings)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # No network at run time: Nipype otherwise asks rig.mit.edu (etelemetry) for its latest
    # version when it creates an interface. Set before anything below imports nipype.
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    verbose = any(a in ("-v", "-vv", "--verbose") for a in argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return _run_subcommand(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        _setup_logging(args.verbose, args.quiet)
        if args.analysis_level == "participant":
            if int(os.environ.get("WORLD_SIZE") or 1) > 1 and "LOCAL_RANK" in os.environ:
                raise UsageError("the participant level does not run under torchrun (every rank would process "
                                 "every subject); run it as one process (--nprocs N) or one job per subject")
            return _participant(participant_settings(args))
        settings = group_settings(args)
        from .learn.group import run_group
        return int(run_group(settings) or 0)
    except BidsAppError as exc:
        if verbose:
            LOG.exception("error")
        print(f"bids_adhd: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("bids_adhd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `bids_adhd model-info --json | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

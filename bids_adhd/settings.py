"""What one command asks for: frozen, validated settings objects built by ``cli.py``.

The library's entry points (``workflows.run.run_participant``,
``learn.group.run_group``, ``learn.predict.predict_runs``, ``simulate.run``)
take these objects, never an ``argparse.Namespace``: the command line is one way
to build them, a test or a script another (``ParticipantSettings(bids_dir, out)``).
Each ``__post_init__`` checks what can be checked without touching the disk, with
the command line's option names in its messages. The allowed values of the
options live here, once; ``cli.py`` reads them for its ``choices``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import one_of
from .errors import UsageError

NIPYPE_PLUGINS = ("Linear", "MultiProc", "SLURMGraph")
DEVICES = ("auto", "cpu", "cuda")
CV_MODES = ("stratified", "site")            # stratified k-fold | leave-one-site-out
HARMONIZE_METHODS = ("none", "combat")       # ComBat of the frozen features, per training fold (learn/harmonize.py)
SIMULATOR_PROFILES = ("demo", "realistic")


def _positive(option: str, value) -> None:
    if value is not None and int(value) < 1:
        raise UsageError(f"{option} must be ≥ 1 (got {value})")


def _labels(values) -> tuple | None:
    return None if values is None else tuple(values)


@dataclass(frozen=True)
class ParticipantSettings:
    """``bids_adhd BIDS_DIR OUTPUT_DIR participant [--model ADAPTER]``."""

    bids_dir: str
    output_dir: str
    participant_label: tuple | None = None      # None: every subject
    session_label: tuple | None = None
    bids_filter_file: str | None = None
    skip_bids_validation: bool = False
    work_dir: str | None = None
    nprocs: int | None = None                   # None: every core
    omp_nthreads: int | None = None
    nipype_plugin: str = "MultiProc"
    pipeline: str = "default"
    model: str | None = None                    # an adapter: predict after the workflow
    allow_training_subjects: bool = False
    weights: str | None = None
    device: str = "auto"
    verbose: int = 0

    def __post_init__(self):
        object.__setattr__(self, "participant_label", _labels(self.participant_label))
        object.__setattr__(self, "session_label", _labels(self.session_label))
        _positive("--nprocs", self.nprocs)
        _positive("--omp-nthreads", self.omp_nthreads)
        one_of("--nipype-plugin", self.nipype_plugin, NIPYPE_PLUGINS)
        one_of("--device", self.device, DEVICES)


@dataclass(frozen=True)
class GroupSettings:
    """``bids_adhd BIDS_DIR OUTPUT_DIR group``: selection, labels, training and statistics options."""

    bids_dir: str
    output_dir: str
    participant_label: tuple | None = None
    pipeline: str = "paper"
    nprocs: int | None = None                   # torch threads
    weights: str | None = None
    label_column: str = "diagnosis"
    positive: tuple = ("ADHD",)
    negative: tuple | None = None
    label_file: str | None = None
    qc_exclude: tuple = ()
    folds: int | None = None                    # None: the preset's
    seed: int | None = None                     # None: the preset's
    device: str = "auto"
    resume: bool = False
    quiet: bool = False
    cv: str = "stratified"
    permutations: int | None = None             # None: StatsOptions' default
    confounds: tuple | None = None              # None: the default confounds; ("none",): none
    saliency: bool = True
    harmonize: str = "none"

    def __post_init__(self):
        object.__setattr__(self, "participant_label", _labels(self.participant_label))
        object.__setattr__(self, "positive", tuple(self.positive or ("ADHD",)))
        object.__setattr__(self, "negative", _labels(self.negative))
        object.__setattr__(self, "qc_exclude", tuple(self.qc_exclude or ()))
        object.__setattr__(self, "confounds", _labels(self.confounds))
        object.__setattr__(self, "label_column", self.label_column or "diagnosis")
        if self.seed is not None and int(self.seed) < 0:
            raise UsageError(f"--seed must be ≥ 0 (got {self.seed})")
        if self.permutations is not None and int(self.permutations) < 0:
            raise UsageError(f"--permutations must be ≥ 0 (got {self.permutations})")
        _positive("--nprocs", self.nprocs)
        one_of("--cv", self.cv, CV_MODES)
        one_of("--harmonize", self.harmonize, HARMONIZE_METHODS)
        one_of("--device", self.device, DEVICES)


@dataclass(frozen=True)
class SimulateSettings:
    """``bids_adhd simulate OUT_DIR``: both profiles (``--profile demo|realistic``)."""

    out_dir: str
    profile: str = "demo"
    subjects: int = 20
    seed: int = 0
    size: str = "demo"
    effect: float = 0.08
    snr: float = 25.0
    sessions: int = 1
    directions: int | None = None
    motion: bool = True
    motion_confound: float = 0.0
    eddy: bool = True
    dropouts: bool = True
    nprocs: int = 1
    effect_d: float | None = None               # realistic profile; None: its default
    carrier_fraction: float | None = None
    motion_ratio: float | None = None

    def __post_init__(self):
        one_of("--profile", self.profile, SIMULATOR_PROFILES)


def from_namespace(cls, namespace, **overrides):
    """``cls`` from the parsed command line: the namespace's attributes that are ``cls``'s fields."""
    from dataclasses import fields

    given = vars(namespace)
    values = {f.name: given[f.name] for f in fields(cls) if f.name in given}
    values.update(overrides)
    return cls(**values)

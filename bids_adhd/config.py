"""Small frozen configuration objects and the named presets in ``pipelines/``.

A *pipeline* is one YAML file with up to five sections, each mapped onto one
frozen dataclass below. Unknown keys are an error (a typo must not silently
fall back to a default). ``load_pipeline("fast")`` reads the packaged preset,
``load_pipeline("/path/my.yaml")`` a user file; a user file may name
``base: paper`` to start from a preset and override only some keys.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import MissingInputError, UsageError


def one_of(option: str, value, allowed) -> None:
    """UsageError unless ``value`` is one of ``allowed`` (the one message for every such check)."""
    if value not in allowed:
        raise UsageError(f"{option} must be one of {', '.join(map(str, allowed))} (got {value!r})")

# The allowed values of the string-valued keys, defined once (checked in __post_init__, listed in the docs).
DENOISE_METHODS = ("mppca", "patch2self", "none")
DTI_FITS = ("WLS", "OLS", "NLLS", "RESTORE")
MOTION_OUTLIER_MODES = ("replace", "keep", "drop-volume")
EDDY_MODELS = ("linear", "none")          # motion_eddy_model (bids_adhd.dmri.motion._eddy_linear_model)
ADAPTATIONS = ("lora", "peft-lora", "linear-probe", "full", "scratch")
LORA_FACTORISATIONS = ("flat", "kernel2d")
FEATURE_CHANNELS = ("fa", "md")
STEM_INITS = ("average", "duplicate")
POOLINGS = ("avg", "multiscale", "avgmax", "spatial")
INTENSITY_MODES = ("none", "mean", "zscore")
BALANCE_MODES = ("loss", "sampler", "none")
AMP_MODES = ("bf16", "fp16", "none")
NORM_MODES = ("train", "recalibrate", "frozen")


@dataclass(frozen=True)
class PreprocConfig:
    """Participant-level preprocessing (DIPY inside Nipype nodes)."""

    denoise: str = "mppca"            # mppca | patch2self | none
    denoise_patch_radius: int = 2     # MP-PCA patch radius (DIPY default 2 → 5³ patch)
    denoise_stride: int = 1           # MP-PCA patch-centre step; 1 = every voxel (DIPY), 2 ≈ 7× less work
    gibbs: bool = True                # Gibbs unringing (DIPY gibbs_removal)
    gibbs_slice_axis: int = 2
    gibbs_n_points: int = 3
    motion: bool = True               # motion (+ eddy) correction: each volume registered to its prediction
    motion_rounds: int = 2            # predict-then-register rounds (fewer when the transforms stop changing)
    motion_eddy: bool = True          # affine eddy stage along the phase-encoding axis (needs PhaseEncodingDirection)
    motion_eddy_model: str = "linear"  # eddy scale/shears per shell: linear in the gradient (FSL eddy --slm linear) | none
    motion_outliers: str = "replace"  # slice dropouts: replace (by the prediction) | keep | drop-volume
    motion_outlier_z: float = 4.0     # a dropout slice: this many robust SDs below the slice's median residual
    motion_slice_axis: int = 2        # acquisition slice axis (dropouts are per slice along it)
    motion_level_iters: tuple = (100, 20)   # DIPY affine optimiser, coarse → fine
    motion_factors: tuple = (2, 1)
    motion_sigmas: tuple = (1.0, 0.0)
    motion_sampling: float = 0.25     # share of voxels the MI metric samples (DIPY sparse sampling); 1 = all
    motion_min_samples: int = 40000   # ... but never fewer points than this (full-resolution level)
    motion_head_margin: int | None = 3  # sample only the reference head grown by this many voxels; null: whole box
    b0_threshold: float = 50.0        # s/mm²; b ≤ this counts as b0
    mask_median_radius: int = 2       # DIPY median_otsu
    mask_numpass: int = 2
    dti_fit: str = "WLS"              # WLS | OLS | NLLS | RESTORE
    dti_bmax: float = 1500.0          # shells above this are left out of the tensor fit
    fd_outlier_mm: float = 0.5        # a volume with FD above this is an outlier
    fd_radius_mm: float = 50.0        # head radius for Power's framewise displacement

    def __post_init__(self):
        one_of("denoise", self.denoise, DENOISE_METHODS)
        one_of("dti_fit", self.dti_fit, DTI_FITS)
        if not 1 <= int(self.denoise_stride) <= 2 * int(self.denoise_patch_radius) + 1:
            raise UsageError(f"denoise_stride must be between 1 and the patch width 2 x denoise_patch_radius + 1 "
                             f"(got {self.denoise_stride!r})")
        if int(self.motion_min_samples) < 1000:
            raise UsageError(f"motion_min_samples must be at least 1000 (got {self.motion_min_samples!r})")
        one_of("motion_outliers", self.motion_outliers, MOTION_OUTLIER_MODES)
        one_of("motion_eddy_model", self.motion_eddy_model, EDDY_MODELS)
        if not 1 <= int(self.motion_rounds) <= 10:
            raise UsageError(f"motion_rounds must be between 1 and 10 (got {self.motion_rounds!r})")
        if int(self.motion_slice_axis) not in (0, 1, 2):
            raise UsageError(f"motion_slice_axis must be 0, 1 or 2 (got {self.motion_slice_axis!r})")
        if self.motion_head_margin is not None and not 0 <= int(self.motion_head_margin) <= 20:
            raise UsageError(f"motion_head_margin must be null or between 0 and 20 voxels "
                             f"(got {self.motion_head_margin!r})")
        if not 0 < float(self.motion_sampling) <= 1:
            raise UsageError(f"motion_sampling must be in (0, 1] (got {self.motion_sampling!r})")


@dataclass(frozen=True)
class TemplateConfig:
    """The fixed grid in template space (MNI152NLin2009aSym, the only one) that the network reads."""

    resolution_mm: float = 2.0
    shape: tuple = (96, 96, 96)       # voxels; each divisible by 16 (4 stride-2 stages); 192 mm cube
    syn: bool = False                 # follow the affine with DIPY SyN
    registration_mm: float = 2.0      # resolution of the FA-like target the affine fits
    affine_level_iters: tuple = (1000, 200, 50)
    affine_factors: tuple = (4, 2, 1)
    affine_sigmas: tuple = (3.0, 1.0, 0.0)

    def __post_init__(self):
        if len(self.shape) != 3 or any(int(s) % 16 for s in self.shape):
            raise UsageError(f"template shape must be 3 sizes divisible by 16 (got {self.shape})")
        if self.resolution_mm <= 0:
            raise UsageError("template resolution_mm must be positive")
        if self.registration_mm <= 0:
            raise UsageError(f"template registration_mm must be positive (got {self.registration_mm!r})")


@dataclass(frozen=True)
class ModelConfig:
    """Foundation encoder + adaptation + head."""

    foundation: str = "ct-fm"         # manifest name in models/
    pretrained: bool = True           # False: random init on purpose (the 'scratch' baseline)
    adaptation: str = "lora"          # lora | peft-lora | linear-probe | full | scratch
    lora_factorisation: str = "flat"  # flat | kernel2d
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_target: str = ""             # regex of the Conv3d names LoRA wraps; "" = the manifest's lora.target
    train_norm: bool = True           # BatchNorm affine parameters trainable
    channels: tuple = ("fa",)         # ("fa",) or ("fa", "md")
    stem_init: str = "average"        # how a 1-channel stem takes >1 channels: average | duplicate
    pooling: str = "avg"              # avg | multiscale | avgmax | spatial (see docs/group.md)
    intensity: str = "none"           # per-subject input normalisation: none | mean | zscore (docs/group.md)
    feature_levels: tuple = ()        # encoder levels the pooling reads; () = avg: the last, others: all
    head_norm: bool = False           # BatchNorm1d (no affine, no parameters) on the pooled features
    head_hidden: int = 128
    head_dropout: float = 0.0
    num_classes: int = 2

    def __post_init__(self):
        one_of("adaptation", self.adaptation, ADAPTATIONS)
        one_of("lora_factorisation", self.lora_factorisation, LORA_FACTORISATIONS)
        if self.lora_rank < 1:
            raise UsageError("lora_rank must be ≥ 1")
        bad = set(self.channels) - set(FEATURE_CHANNELS)
        if bad or not self.channels:
            raise UsageError(f"channels must be taken from {', '.join(FEATURE_CHANNELS)} (got {self.channels})")
        one_of("stem_init", self.stem_init, STEM_INITS)
        if self.adaptation == "peft-lora" and self.lora_factorisation != "flat":
            raise UsageError("adaptation 'peft-lora' supports only lora_factorisation: flat")
        one_of("pooling", self.pooling, POOLINGS)
        one_of("intensity", self.intensity, INTENSITY_MODES)
        levels = list(self.feature_levels)
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in levels) \
                or len(set(levels)) != len(levels):
            raise UsageError(f"feature_levels must be distinct encoder level numbers ≥ 0 (got {self.feature_levels})")


@dataclass(frozen=True)
class TrainConfig:
    """Group-level training and cross-validation."""

    folds: int = 5
    seed: int = 0
    epochs: int = 50
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_epochs: int = 2
    patience: int = 10                # early stopping on the inner validation split
    inner_val_fraction: float = 0.2
    balance: str = "loss"             # loss | sampler | none
    augment_flip: bool = False
    augment_affine: bool = False
    amp: str = "bf16"                 # bf16 | fp16 | none (GPU only; CPU runs fp32)
    stratify_site: bool = False
    num_workers: int = 0
    norm_mode: str = "train"          # BatchNorm statistics: train | recalibrate | frozen (docs/group.md)
    head_epochs: int = 0              # head warm-up steps on cached features before fine-tuning (0: none)
    head_lr: float = 1e-2             # learning rate of the head warm-up

    def __post_init__(self):
        if self.folds < 2:
            raise UsageError(f"--folds must be at least 2 (got {self.folds})")
        one_of("balance", self.balance, BALANCE_MODES)
        one_of("amp", self.amp, AMP_MODES)
        one_of("norm_mode", self.norm_mode, NORM_MODES)
        if self.epochs < 0 or self.head_epochs < 0:
            raise UsageError("epochs and head_epochs must be ≥ 0")


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "default"
    description: str = ""
    preproc: PreprocConfig = field(default_factory=PreprocConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json_dict(self) -> dict:
        """The configuration as JSON/YAML-safe data (tuples as lists); ``from_dict`` reads it back."""
        return _json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "pipeline") -> "PipelineConfig":
        """The one reader of a configuration as data: a preset (after ``base:`` merging), the dict an
        adapter or ``group/config.json`` stores. Unknown sections or keys are a ``UsageError``; keys
        that an older version wrote and this one dropped (``_REMOVED_KEYS``) are skipped."""
        unknown = set(data) - set(_SECTIONS) - {"name", "description"}
        if unknown:
            raise UsageError(f"{where}: unknown section(s) {', '.join(sorted(unknown))}")
        sections = {k: _build(sec, {key: v for key, v in (data.get(k) or {}).items()
                                    if key not in _REMOVED_KEYS.get(k, ())}, f"{where} [{k}]")
                    for k, sec in _SECTIONS.items()}
        return cls(name=str(data.get("name", "default")), description=str(data.get("description") or "").strip(),
                   **sections)

    def replace(self, section: str | None = None, **changes) -> "PipelineConfig":
        """A copy with some keys changed: ``cfg.replace("train", folds=3)``."""
        if section is None:
            return dataclasses.replace(self, **changes)
        sub = dataclasses.replace(getattr(self, section), **changes)
        return dataclasses.replace(self, **{section: sub})


_SECTIONS = {"preproc": PreprocConfig, "template": TemplateConfig,
             "model": ModelConfig, "train": TrainConfig}
#: keys older versions wrote that nothing read: skipped when read back (an old adapter stays readable)
_REMOVED_KEYS = {"template": ("space",)}


def section_from_dict(section: str, values: Mapping[str, Any]):
    """One section (``"template"``, ...) from its data, e.g. a Nipype node's dict input."""
    return _build(_SECTIONS[section], values, f"pipeline [{section}]")


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _build(cls, values: Mapping[str, Any], where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(known))}")
    kwargs = {}
    for key, value in values.items():
        default = known[key].default
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: {exc}") from None


def _data_dir(name: str) -> Path:
    """``pipelines/`` or ``models/``: packaged with the wheel, or the checkout's."""
    try:
        packaged = resources.files(f"bids_adhd.{name}")
        if packaged.is_dir():
            return Path(str(packaged))
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / name


def pipelines_dir() -> Path:
    return _data_dir("pipelines")


def models_dir() -> Path:
    return _data_dir("models")


def preset_names() -> list[str]:
    return sorted(p.stem for p in pipelines_dir().glob("*.yaml"))


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"pipeline file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"pipeline file {path} must hold a mapping of sections")
    return data


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _raw(name_or_path: str, _seen: tuple = ()) -> dict:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in name_or_path:
        if not path.is_file():
            raise MissingInputError(f"pipeline file {name_or_path} not found")
    else:
        path = pipelines_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UsageError(f"unknown pipeline {name_or_path!r}; choose one of "
                             f"{', '.join(preset_names())} or give a YAML path")
    data = _read_yaml(path)
    data.setdefault("name", path.stem)
    base = data.pop("base", None)
    if base:
        if base in _seen:
            raise UsageError(f"pipeline {name_or_path}: 'base' chain loops through {base}")
        parent = _raw(base, _seen + (name_or_path,))
        parent.pop("name", None)
        parent.pop("description", None)
        data = _merge(parent, data)
    return data


def load_pipeline(name_or_path: str = "default") -> PipelineConfig:
    """A preset by name (``pipelines/<name>.yaml``) or a YAML file path."""
    return PipelineConfig.from_dict(_raw(str(name_or_path)), f"pipeline {name_or_path}")

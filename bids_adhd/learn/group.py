"""``bids_adhd BIDS_DIR OUTPUT_DIR group``: cross-validated training of the ADHD classifier.

Steps (each is a function below; see ``docs/group.md`` for the design):

1. inputs: the preset (``--pipeline``, default ``paper``), labels from
   ``participants.tsv`` or ``--label-file`` (``--label-column``, ``--positive``,
   ``--negative``: values or patterns, see :mod:`.labels`), the template-space
   maps of every subject in OUTPUT_DIR, ``--qc-exclude`` rules over the
   participant level's QC JSON (subjects without maps, without a label, with a
   value in neither class, or runs a rule excludes are listed in
   ``group/excluded.tsv`` and left out);
2. subject-level stratified k-fold (``crossval``), written to
   ``group/folds.tsv`` before any training;
3. one model per fold (``train``), its adapter, predictions and metrics under
   ``group/fold-<k>/``; pooled out-of-fold metrics;
4. a final model from every labelled subject (``group/final/adapter.safetensors``): its weights
   are fitted on its inner-train part (~80 %), the inner-validation rest drives early stopping,
   calibration and the threshold (as in every fold);
5. ``group/metrics.json``, ``group/predictions.tsv``, figures and the HTML report.

``--resume`` continues a killed analysis: finished folds are skipped, an
unfinished one continues from its last epoch checkpoint, with the saved fold
assignment.

Words: a *run* is a BIDS run (one DWI series of a subject: ``inputs.runs``,
the run key ``sub-X[_ses-Y]...``, ``p_runs`` = one probability per run, averaged
per subject); one invocation of the group level is the *analysis*
(:class:`GroupContext`, :func:`summarise_analysis`); training one model is a
*fit* (:func:`fit_fold`, :func:`fit_final`).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same steps run in every process,
with the batches split among them, DistributedDataParallel for the training and
only rank 0 writing; see :mod:`bids_adhd.learn.distributed` and ``docs/deploy.md``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from .. import derivatives as dv
from ..errors import MissingInputError, UsageError
from ..settings import GroupSettings

LOG = logging.getLogger("bids_adhd.group")

#: fewer labelled subjects than this (with maps) is an error
MIN_SUBJECTS = 4


@dataclass
class GroupInputs:
    subjects: list[str]                   # labelled subjects with maps, sorted
    labels: dict[str, int]                # subject -> 0/1
    sites: dict[str, str | None]
    runs: dict[str, list]                 # subject -> [RunMaps]
    class_names: tuple[str, str]          # (negative, positive)
    missing_maps: list[str] = field(default_factory=list)
    unlabelled: list[str] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)    # rows of group/excluded.tsv
    selection: dict = field(default_factory=dict)         # the label/QC selection and its counts
    covariates: dict = field(default_factory=dict)        # subject → merged participants/label-file row


# --- inputs ------------------------------------------------------------------------

def bids_subjects(bids_dir: Path) -> list[str]:
    return sorted(p.name[4:] for p in Path(bids_dir).glob("sub-*") if p.is_dir())


def collect_inputs(bids_dir: Path, out_root: Path, column: str, positive, folds: int,
                   participant_label=None, pipeline_name: str = "fast", *, negative=None, label_file=None,
                   qc_exclude=()) -> GroupInputs:
    """Labels, maps and exclusions → the subjects and runs to analyse (see :mod:`.labels`).

    ``positive``/``negative``: a value or a list of values/patterns (``negative``
    None: every other value is negative); ``label_file``: a TSV used instead of
    participants.tsv for the labels; ``qc_exclude``: rules over the QC JSON.
    """
    from ..bids import clean_labels
    from .crossval import check_class_counts
    from .data import find_template_maps
    from .labels import map_labels, read_label_values

    spec = _label_spec(column, positive, negative, label_file, qc_exclude)
    values, covariates, source = read_label_values(bids_dir, spec)
    mapping = map_labels(values, spec)
    complete, incomplete = find_template_maps(out_root)
    wanted = set(bids_subjects(bids_dir)) | set(mapping.values)
    selected = clean_labels(participant_label, "sub")
    if selected:
        unknown = sorted(set(selected) - wanted - set(complete))
        if unknown:
            raise UsageError(f"--participant-label {', '.join(unknown)} not in {bids_dir}")
        wanted = set(selected)
    with_maps = sorted(s for s in complete if s in wanted or not selected)
    missing = sorted(s for s in wanted if s not in complete)
    hint = (f"run the participant level first: bids_adhd {bids_dir} {out_root} participant "
            f"--pipeline {pipeline_name}")
    if not with_maps:
        raise MissingInputError(f"no template-space FA/MD maps in {out_root} for "
                                f"{_few(['sub-' + s for s in missing]) or 'any subject'}; {hint}")
    for s, names in sorted(incomplete.items()):
        LOG.warning("sub-%s: incomplete template-space outputs (missing %s); left out", s, ", ".join(names[:3]))
    unlabelled = sorted(s for s in with_maps if s not in mapping.values)
    if missing:
        LOG.warning("%d subject(s) have no template-space maps in %s and are left out: %s (%s)",
                    len(missing), out_root, _few(["sub-" + s for s in missing], 10), hint)
    if unlabelled:
        LOG.warning("%d subject(s) with maps have no %s in %s and are left out: %s", len(unlabelled), column,
                    Path(source).name, _few(["sub-" + s for s in unlabelled], 10))
    runs, excluded, undecided = _apply_exclusions(spec, mapping, with_maps, complete, out_root)
    subjects = sorted(runs)
    if len(subjects) < MIN_SUBJECTS:
        raise MissingInputError(f"only {len(subjects)} labelled subject(s) have template-space maps "
                                f"(missing maps: {_few(['sub-' + s for s in missing]) or 'none'}; runs excluded "
                                f"by --qc-exclude: {len(excluded)}); the group level needs at least "
                                f"{MIN_SUBJECTS}; {hint}")
    if missing:
        LOG.warning("proceeding with the %d labelled subjects that have maps", len(subjects))
    y = {s: int(mapping.labels[s]) for s in subjects}
    check_class_counts([y[s] for s in subjects], folds, mapping.class_names, column)
    excluded = _left_out_rows(missing, unlabelled, mapping, with_maps) + excluded
    selection = _selection(spec, source, mapping, with_maps, subjects, excluded, incomplete)
    selection["qc_undecided"] = undecided
    return GroupInputs(subjects, y, {s: covariates.get(s, {}).get("site") for s in subjects}, runs,
                       mapping.class_names, missing, unlabelled, excluded=excluded, selection=selection,
                       covariates={s: covariates.get(s, {}) for s in subjects})


def _label_spec(column, positive, negative, label_file, qc_exclude):
    """The selection options as a frozen ``LabelSpec``; a malformed QC rule stops here, before anything is read."""
    from .labels import LabelSpec, parse_rule

    def as_tuple(v) -> tuple:
        return (v,) if isinstance(v, str) else tuple(v)

    spec = LabelSpec(column, as_tuple(positive), None if negative is None else as_tuple(negative),
                     None if label_file is None else str(label_file), as_tuple(qc_exclude or ()))
    for text in spec.qc_exclude:
        parse_rule(text)
    return spec


def _apply_exclusions(spec, mapping, with_maps: list, complete: dict, out_root: Path) -> tuple[dict, list, list]:
    """Label-value exclusion is logged here; QC rules drop runs (a subject with none left is out)."""
    from .labels import class_values, qc_exclusions

    runs = {s: complete[s] for s in with_maps if s in mapping.labels}
    counts = class_values(mapping, with_maps)
    for value, n in counts["excluded"].items():
        LOG.info("%d subject(s) with %s = %r match neither --positive nor --negative: excluded", n, spec.column,
                 value)
    if spec.negative is None:
        LOG.info("no --negative: every %s value not matching %s is the negative class (%s)", spec.column,
                 " ".join(spec.positive), ", ".join(f"{v}: {n}" for v, n in counts["negative"].items()))
    kept, rows, undecided = qc_exclusions(spec.qc_exclude, runs, out_root)
    for r in rows:
        LOG.warning("%s excluded by --qc-exclude: %s", r["run"], r["detail"])
    for r in undecided:
        LOG.warning("%s: --qc-exclude cannot decide %s (a metric is null); the run is kept", r["run"], r["detail"])
    gone = sorted(set(runs) - set(kept))
    if gone:
        LOG.warning("%d subject(s) have no run left after --qc-exclude and are left out: %s", len(gone),
                    _few(["sub-" + s for s in gone], 10))
    return kept, [{"participant_id": "sub-" + r["subject"], "run": r["run"], "reason": "qc",
                   "detail": r["detail"]} for r in rows], [
        {"participant_id": "sub-" + r["subject"], "run": r["run"], "rule": r["rule"], "detail": r["detail"]}
        for r in undecided]


def _left_out_rows(missing, unlabelled, mapping, with_maps) -> list[dict]:
    rows = [{"participant_id": "sub-" + s, "run": "n/a", "reason": "no_maps",
             "detail": "no template-space maps in OUTPUT_DIR"} for s in missing]
    rows += [{"participant_id": "sub-" + s, "run": "n/a", "reason": "no_label", "detail": "label is n/a or empty"}
             for s in unlabelled]
    rows += [{"participant_id": "sub-" + s, "run": "n/a", "reason": "label_value",
              "detail": f"{mapping.excluded[s]!r} matches neither --positive nor --negative"}
             for s in with_maps if s in mapping.excluded]
    return rows


def _selection(spec, source, mapping, with_maps, subjects, excluded, incomplete) -> dict:
    """Who was analysed and why the others were not: recorded in config.json, metrics.json, the report."""
    from .labels import class_values

    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest() if spec.label_file else None
    return {**spec.to_dict(), "label_source": source, "label_file_sha256": digest,
            "class_names": list(mapping.class_names),
            "negative_rule": mapping.negative_rule, "unmatched_patterns": mapping.unmatched_patterns,
            "values_analysed": class_values(mapping, subjects),
            "values_with_maps": class_values(mapping, with_maps),
            "n_with_maps": len(with_maps), "n_analysed": len(subjects),
            "n_excluded": dict(Counter(r["reason"] for r in excluded)),
            "incomplete_maps": sorted(incomplete)}


def _few(items, n: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def package_versions() -> dict:
    out = {"bids_adhd": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for name in ("torch", "monai", "numpy", "scipy", "scikit-learn", "nibabel", "safetensors", "peft", "dipy",
                 "nipype", "nilearn", "matplotlib"):
        try:
            from importlib.metadata import version
            out[name] = version(name)
        except Exception:
            out[name] = None
    try:
        import torch
        out["cuda"] = torch.version.cuda
        out["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        pass
    return out


# --- the analysis (one invocation of the group level) -------------------------------

def resolve_config(settings: GroupSettings):
    """The settings' preset with ``--folds`` and ``--seed`` applied."""
    from ..config import load_pipeline

    cfg = load_pipeline(settings.pipeline)
    changes = {}
    if settings.folds is not None:
        changes["folds"] = int(settings.folds)
    if settings.seed is not None:
        changes["seed"] = int(settings.seed)
    if changes:
        cfg = cfg.replace("train", **changes)
    return cfg


def run_group(settings: GroupSettings) -> int:
    """The group level of ``settings`` (built by ``cli.py``); under torchrun one process per GPU (see
    :mod:`bids_adhd.learn.distributed`)."""
    from .distributed import close, leaving, setup

    dist, device = setup(settings.device)
    try:
        return _run_group(settings, dist, device)
    except BaseException:
        leaving()
        raise
    finally:
        close()


def _run_group(settings: GroupSettings, dist, device) -> int:
    import torch

    from ..bids import check_bids_dir
    from ..dmri.template import template_grid

    t_start = time.perf_counter()
    with dist.phase():          # every rank; an error on any rank stops them all with its exit code
        bids_dir = check_bids_dir(settings.bids_dir)
        out_root = Path(settings.output_dir).expanduser().resolve()
        if not out_root.is_dir():
            raise MissingInputError(f"OUTPUT_DIR {settings.output_dir} does not exist; run the participant level "
                                    f"first (bids_adhd {settings.bids_dir} {settings.output_dir} participant)")
        cfg = resolve_config(settings)
        if settings.nprocs:
            torch.set_num_threads(int(settings.nprocs))
        column = settings.label_column
        positive = list(settings.positive)
        inputs = collect_inputs(bids_dir, out_root, column, positive, cfg.train.folds, settings.participant_label,
                                cfg.name, negative=settings.negative, label_file=settings.label_file,
                                qc_exclude=settings.qc_exclude)
        opts, cfg = _stats_setup(settings, cfg, inputs)
        # --- the model, built once --------------------------------------------------
        model, info, fingerprint, init, warning = _build_model_once(cfg, settings.weights, dist, device)
        # every rank computes the folds from the seed; they must agree (checked below)
        computed = _assign(inputs, cfg, opts)

    resume = settings.resume
    progress = not settings.quiet
    _check_ranks(dist, cfg, inputs, fingerprint, computed)
    # --- group/ and the folds (rank 0 writes): saved first, reused on resume ------------
    gdir, assignment = dist.on_main(_prepare_group_dir, out_root, cfg, inputs, computed, resume, column,
                                    positive, device, dist.world)
    LOG.info("group level: %d subjects (%s), pipeline %s, %d folds, seed %d, device %s%s",
             len(inputs.subjects), ", ".join(f"{n} {name}" for name, n in zip(
                 inputs.class_names, np.bincount([inputs.labels[s] for s in inputs.subjects], minlength=2))),
             cfg.name, cfg.train.folds, cfg.train.seed, device,
             f" x {dist.world} processes" if dist.enabled else "")
    ckpt_root = gdir / "checkpoints"

    # --- data, loaded once (by every rank) ---------------------------------------------
    with dist.phase():
        grid = template_grid(cfg.template)
        images, index = _load_images(inputs, cfg, grid)

    ctx = GroupContext(cfg=cfg, device=device, model=model, init=init, info=info, fingerprint=fingerprint,
                     grid=grid, inputs=inputs, images=images, index=index, gdir=gdir, ckpt_root=ckpt_root,
                     resume=resume, progress=progress, column=column, opts=opts, bids_dir=bids_dir,
                     out_root=out_root)

    # --- cross-validation --------------------------------------------------------
    fold_results = []
    for k in range(cfg.train.folds):
        fold_results.append(fit_fold(ctx, k, assignment))
    # --- final model ---------------------------------------------------------------
    final = fit_final(ctx)
    # the permutation test's frozen features: the encoder reset to its state as built (after the
    # final model's adapter is saved, so nothing before or during the training waits for it)
    ctx.features = _frozen_features(ctx) if opts.permutations else None
    # rank 0 writes (the checkpoints' removal included); the others wait for it
    results = dist.on_main(summarise_analysis, ctx, fold_results, final, warning, time.perf_counter() - t_start)
    LOG.info("pooled out-of-fold: %s", _fmt_pooled(results["pooled"]))
    if warning:
        LOG.warning(warning)
    LOG.info("group level finished in %.0f s; results in %s (report: %s)", time.perf_counter() - t_start, gdir,
             gdir / "report.html")
    return 0


def _build_model_once(cfg, weights, dist, device):
    """(model, info, encoder fingerprint, initial adapter state, random-init warning or None): the
    classifier, built once per run from the seed, on ``device``; every fold starts from ``init``."""
    import torch

    from .classifier import build_model
    from .train import initial_state

    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    model, info = build_model(cfg.model, weights=weights, fingerprint=True)
    fingerprint = info["encoder_fingerprint"]
    model.to(device).to(memory_format=torch.channels_last_3d)
    if dist.prepare_model(model, cfg):
        LOG.info("torchrun: the encoder's BatchNorm layers are SyncBatchNorm (statistics of the global batch)")
    init = initial_state(model)
    report = info["parameters"]
    LOG.info("model: %s + %s, %d trainable of %d parameters (built in %.0f s)", cfg.model.foundation,
             cfg.model.adaptation, report["trainable"], report["total"], time.perf_counter() - t0)
    warning = None
    if not info.get("pretrained"):
        if cfg.model.pretrained:
            warning = (f"The foundation encoder is RANDOMLY INITIALISED: no {cfg.model.foundation} weights were "
                       f"found (bids_adhd fetch-model {cfg.model.foundation}, or --weights PATH). These results "
                       "are NOT those of the pre-trained model.")
        else:
            warning = (f"The encoder is randomly initialised on purpose (pipeline {cfg.name}: pretrained: "
                       "false); no pre-training is involved.")
        LOG.warning(warning)
    return model, info, fingerprint, init, warning


def _check_ranks(dist, cfg, inputs: GroupInputs, fingerprint: str, computed: dict) -> None:
    """Under torchrun: every rank has the same subjects, labels, pipeline, encoder and folds."""
    dist.check_same({"subjects": inputs.subjects, "labels": inputs.labels, "encoder": fingerprint,
                     "folds": computed, "pipeline": cfg.to_dict()},
                    "set of subjects, labels, pipeline, encoder weights or fold assignment")
    if dist.enabled:
        LOG.info("torchrun: subjects, labels, encoder and fold assignment identical on all %d ranks", dist.world)
        if cfg.train.batch_size < dist.world * (2 if cfg.train.norm_mode == "train" else 1):
            LOG.warning("torchrun: batch_size %d is too small for %d processes: some get padding only; raise "
                        "batch_size (it is the global batch) or start fewer processes",
                        cfg.train.batch_size, dist.world)


def _stats_setup(settings: GroupSettings, cfg, inputs: GroupInputs):
    """(the statistics' options, cfg): with ``--cv site`` the number of folds is the number of sites."""
    from .groupstats import stats_options

    opts = stats_options(settings, cfg.train.seed)
    if opts.cv == "site":
        cfg = cfg.replace("train", folds=max(1, len({inputs.sites[s] for s in inputs.subjects})))
    if opts.harmonize != "none":                   # refused before the model is built (the folds are cheap)
        from .harmonize import check_harmonize
        check_harmonize(opts.harmonize, opts.cv, inputs.sites, _assign(inputs, cfg, opts))
    return opts, cfg


def _assign(inputs: GroupInputs, cfg, opts) -> dict[str, int]:
    """Subject → fold: leave-one-site-out (``--cv site``) or stratified k-fold (by label [× site])."""
    from .crossval import assign_folds, assign_site_folds

    subjects = inputs.subjects
    labels = [inputs.labels[s] for s in subjects]
    if opts.cv == "site":
        return assign_site_folds(subjects, labels, [inputs.sites[s] for s in subjects], inputs.class_names)
    sites = [inputs.sites[s] for s in subjects] if cfg.train.stratify_site else None
    return assign_folds(subjects, labels, cfg.train.folds, cfg.train.seed, sites)


def _frozen_features(ctx) -> np.ndarray:
    """(subjects, features): the encoder's pooled features as built (no fine-tuning), runs averaged;
    the permutation test's input (:func:`bids_adhd.learn.groupstats.permutation_test`)."""
    from .data import ItemImages
    from .train import amp_dtype, pooled_features, restore_state

    t0 = time.perf_counter()
    restore_state(ctx.model, ctx.init)
    items = ctx.items(ctx.inputs.subjects)
    f = pooled_features(ctx.model, ItemImages(items), ctx.device, ctx.cfg.train.batch_size,
                        amp_dtype(ctx.device, ctx.cfg.train.amp)).numpy()
    subs = [it["subject"] for it in items]
    out = np.stack([f[[i for i, x in enumerate(subs) if x == s]].mean(0) for s in ctx.inputs.subjects])
    ctx.features_seconds = time.perf_counter() - t0
    LOG.info("frozen features for the permutation test: %d x %d in %.1f s", *out.shape, ctx.features_seconds)
    return out


def _prepare_group_dir(out_root: Path, cfg, inputs: GroupInputs, computed: dict, resume: bool, column: str,
                       positive: str, device, world: int) -> tuple[Path, dict]:
    """OUTPUT_DIR/group and the fold assignment: the saved one on --resume, else ``computed`` (written)."""
    from ..bids import ensure_writable_dir
    from .crossval import check_resume_folds, read_folds, write_folds

    gdir = ensure_writable_dir(dv.group_dir(out_root), "OUTPUT_DIR/group")
    if resume:
        _remove_stale_temps(gdir)
    folds_path = gdir / "folds.tsv"
    if resume and folds_path.is_file():
        _check_resume_config(gdir, cfg, inputs.selection)
        assignment, saved_labels = read_folds(folds_path, inputs.class_names)
        check_resume_folds(assignment, saved_labels, inputs.labels, cfg.train.folds)
        LOG.info("--resume: reusing the fold assignment in %s", folds_path)
        return gdir, assignment
    if resume:
        LOG.info("--resume: no interrupted run in %s; starting from the beginning", gdir)
    else:
        _clear_previous(gdir)
    dv.write_json(gdir / "config.json", {"pipeline": cfg.to_dict(), "versions": package_versions(),
                                         "label_column": column, "positive": inputs.selection.get("positive"),
                                         "class_names": list(inputs.class_names), "inputs": inputs.selection,
                                         "subjects": inputs.subjects, "device": str(device),
                                         "processes": world, "command": sys.argv})
    write_excluded(gdir / "excluded.tsv", inputs.excluded)
    write_folds(folds_path, computed, inputs.labels, inputs.class_names)
    return gdir, computed


def write_excluded(path: Path, rows: list[dict]) -> Path:
    """group/excluded.tsv: one row per subject (run "n/a") or run left out, with the reason and its detail."""
    cols = ("participant_id", "run", "reason", "detail")
    return dv.write_tsv(path, {c: [r[c] for r in rows] for c in cols})


def _world() -> int:
    from .distributed import current
    return current().world


def _fmt_pooled(m: dict) -> str:
    from .metrics import format_metrics
    return format_metrics(m)


def _clear_previous(gdir: Path) -> None:
    """A fresh (non-resumed) run replaces the previous results in group/."""
    stale = [p for p in gdir.iterdir()] if gdir.is_dir() else []
    if stale:
        LOG.info("replacing the previous group results in %s", gdir)
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _remove_stale_temps(gdir: Path) -> None:
    """--resume: delete the hidden temporary files (``.<name>.<random>.tmp*``, see
    ``derivatives.atomic_path``) a killed run left under group/ (a half-written adapter, a
    report not yet renamed). The group level owns group/: no other job writes there."""
    for tmp in dv.remove_temps_under(gdir):
        LOG.info("--resume: removed %s, left by the interrupted run", tmp.relative_to(gdir))


def _check_resume_config(gdir: Path, cfg, selection: dict | None = None) -> None:
    path = gdir / "config.json"
    if not path.is_file():
        return
    try:
        whole = json.loads(path.read_text())
        saved = whole["pipeline"]
    except (ValueError, KeyError):
        return
    from .labels import LabelSpec

    keys = [k for k in LabelSpec().to_dict() if selection and k in whole.get("inputs", {})]
    changed = [k for k in keys if whole["inputs"][k] != selection.get(k)]
    if changed:
        raise UsageError(f"--resume: {', '.join(changed)} differ(s) from the interrupted run's; use the same "
                         "--label-column/--positive/--negative/--label-file/--qc-exclude or run without --resume")
    now = cfg.to_json_dict()
    if saved != now:
        diff = sorted(f"{sec}.{k}" for sec in now if isinstance(now[sec], dict)
                      for k in now[sec] if saved.get(sec, {}).get(k) != now[sec][k])
        raise UsageError(f"--resume: the pipeline differs from the interrupted run's ({_few(diff) or 'name'}); "
                         "use the same --pipeline/--seed or run without --resume")


def _load_images(inputs: GroupInputs, cfg, grid):
    """Every run's input, streamed: a :class:`~bids_adhd.learn.data.RunImages` (bounded cache) shared by
    all folds, and (subject, run key) → its index there."""
    from .data import RunImages, grid_of, same_grid

    first = inputs.runs[inputs.subjects[0]][0]
    shape, aff = grid_of(first.fa)
    if not same_grid(shape, aff, *grid):
        LOG.warning("the maps in OUTPUT_DIR are on a %s grid of %.3g mm, the %s pipeline's model reads %s at "
                    "%.3g mm: resampling them (run the participant level with --pipeline %s to avoid this)",
                    "x".join(map(str, shape)), abs(aff[0, 0]), cfg.name, "x".join(map(str, grid[0])),
                    abs(grid[1][0, 0]), cfg.name)
    keys = [(s, rm.source.prefix) for s in inputs.subjects for rm in inputs.runs[s]]
    maps = [rm for s in inputs.subjects for rm in inputs.runs[s]]
    t0 = time.perf_counter()
    intensity = getattr(cfg.model, "intensity", "none")
    images = RunImages(maps, cfg.model.channels, grid, intensity, num_workers=int(cfg.train.num_workers))
    LOG.info("%d runs of %d subjects (%s, intensity %s): %d cached in memory (loaded in %.1f s), the others "
             "read per batch", len(maps), len(inputs.subjects), "+".join(cfg.model.channels), intensity,
             images.cache_num, time.perf_counter() - t0)
    return images, {k: i for i, k in enumerate(keys)}


@dataclass
class GroupContext:
    """What every step of one analysis (one invocation of the group level) shares."""

    cfg: object
    device: object
    model: object
    init: dict
    info: dict
    fingerprint: str
    grid: tuple
    inputs: GroupInputs
    images: object                        # RunImages: read per batch
    index: dict                           # (subject, run key) -> position in images
    gdir: Path
    ckpt_root: Path
    resume: bool
    progress: bool
    column: str
    opts: object = None
    bids_dir: Path | None = None
    out_root: Path | None = None
    features: np.ndarray | None = None
    features_seconds: float | None = None

    def items(self, subjects) -> list[dict]:
        out = []
        for s in sorted(subjects):
            for rm in self.inputs.runs[s]:
                out.append({"id": f"{s}:{rm.source.prefix}", "subject": s, "label": self.inputs.labels[s],
                            "images": self.images, "index": self.index[(s, rm.source.prefix)]})
        return out


def _augment(cfg):
    from monai.transforms import Compose, RandAffined, RandFlipd

    aug = []
    if cfg.train.augment_flip:
        aug.append(RandFlipd(keys=["image"], prob=0.5, spatial_axis=0))
    if cfg.train.augment_affine:
        aug.append(RandAffined(keys=["image"], prob=0.8, rotate_range=(np.radians(5),) * 3,
                               scale_range=(0.05,) * 3, translate_range=(1, 1, 1), mode="bilinear",
                               padding_mode="zeros"))
    return Compose(aug) if aug else None


def _train(ctx: GroupContext, name: str, subjects: list[str], seed: int, out_dir: Path) -> dict:
    from .crossval import inner_split
    from .train import train_model

    cfg = ctx.cfg
    tr, va = inner_split(subjects, [ctx.inputs.labels[s] for s in subjects], cfg.train.inner_val_fraction, seed)
    res = train_model(ctx.model, ctx.init, ctx.items(tr), ctx.items(va), cfg, ctx.device,
                      ckpt_dir=ctx.ckpt_root / name, log_path=out_dir / "training_log.tsv", seed=seed,
                      resume=ctx.resume, progress=ctx.progress, desc=name, augment=_augment(cfg),
                      tb_dir=out_dir / "tensorboard")
    res["inner_train"], res["inner_val"] = tr, va
    return res


def _save_adapter(ctx: GroupContext, path: Path, subjects, fold: str, threshold: float = 0.5,
                  calibration: dict | None = None) -> dict:
    from .adapter import save_adapter

    cfg = ctx.cfg
    return save_adapter(path, ctx.model, foundation=cfg.model.foundation, threshold=threshold,
                        extra={"calibration": calibration} if calibration else None,
                        base_weights=ctx.info.get("sha256") if ctx.info.get("pretrained") else None,
                        init_seed=cfg.train.seed, fingerprint=ctx.fingerprint,
                        pipeline=cfg.to_json_dict(), grid=ctx.grid,
                        train_subjects=subjects, class_names=ctx.inputs.class_names,
                        label_column=ctx.column, fold=fold, pretrained=bool(ctx.info.get("pretrained")))


def _read_json_if(path: Path, *also: Path):
    """The JSON at ``path`` if it and every path in ``also`` exist, else None (rank 0 reads, for all)."""
    if path.is_file() and all(p.is_file() for p in also):
        return json.loads(path.read_text())
    return None


def fit_fold(ctx: GroupContext, k: int, assignment: dict) -> dict:
    from .data import ItemImages
    from .distributed import current
    from .metrics import binary_metrics, format_metrics
    from .stats import apply_platt
    from .train import amp_dtype, predict_proba

    cfg = ctx.cfg
    dist = current()
    fdir = ctx.gdir / f"fold-{k + 1}"
    done = fdir / "metrics.json"
    saved = dist.on_main(_read_json_if, done) if ctx.resume else None
    if saved is not None:
        LOG.info("fold %d/%d: finished in the interrupted run; skipped", k + 1, cfg.train.folds)
        return saved
    test = sorted(s for s, f in assignment.items() if f == k)
    train = sorted(s for s, f in assignment.items() if f != k)
    LOG.info("fold %d/%d: %d training, %d test subjects", k + 1, cfg.train.folds, len(train), len(test))
    res = _train(ctx, f"fold-{k + 1}", train, cfg.train.seed * 100 + k + 1, fdir)
    from .lora import lora_update_rel_norm

    lora_rel = lora_update_rel_norm(ctx.model)      # of the kept (restored best) state; 0: head only
    items = ctx.items(test)
    p_runs = predict_proba(ctx.model, ItemImages(items), ctx.device, cfg.train.batch_size,
                          amp_dtype(ctx.device, cfg.train.amp))
    raw = _subject_probs(items, p_runs)
    cal, thr, p_val = _calibration(ctx, res["inner_val"])
    y = [ctx.inputs.labels[s] for s in test]
    p = [float(v) for v in apply_platt([raw[s] for s in test], cal)]
    probs = dict(zip(test, p))
    metrics = binary_metrics(y, p, thr)

    def write() -> dict:                           # rank 0 only; the others wait for its result
        meta = _save_adapter(ctx, fdir / "adapter.safetensors", train, str(k + 1), thr, cal)
        names = ctx.inputs.class_names
        dv.write_tsv(fdir / "predictions.tsv", {"participant_id": [f"sub-{s}" for s in test],
                                               "fold": [k + 1] * len(test),
                                               "label": [names[v] for v in y],
                                               "probability": p,
                                               "probability_uncalibrated": [raw[s] for s in test],
                                               "predicted": [names[int(v >= thr)] for v in p]})
        saliency = _fold_saliency(ctx, fdir, items) if ctx.opts is not None and ctx.opts.saliency else None
        out = {"fold": k + 1, "metrics": metrics, "test": test, "inner_train": res["inner_train"],
               "inner_val": res["inner_val"], "best_epoch": res["best_epoch"], "epochs_run": res["epochs_run"],
               "lora_update_rel_norm": lora_rel, "stopped_early": res["stopped_early"], "seconds": res["seconds"],
               "peak_memory_mb": res["peak_memory_mb"], "model_id": meta["model_id"],
               "predictions": {s: float(probs[s]) for s in test},
               "predictions_uncalibrated": {s: float(raw[s]) for s in test},
               "calibration": cal, "threshold": thr, "inner_val_predictions": p_val, "saliency": saliency,
               "labels": {s: int(v) for s, v in zip(test, y)}, "history": res["history"]}
        dv.write_json(done, out)                   # written last: the fold is finished
        return out

    out = dist.on_main(write)
    LOG.info("fold %d/%d: %s (%.0f s)", k + 1, cfg.train.folds, format_metrics(metrics), res["seconds"])
    return out


def _calibration(ctx: GroupContext, val_subjects) -> tuple[dict | None, float, dict]:
    """(Platt MAP calibration, Youden threshold, raw probabilities) from the trained model's
    predictions of its inner-validation subjects (never the test fold); none: identity and 0.5."""
    from .data import ItemImages
    from .groupstats import calibrate_fold
    from .train import amp_dtype, predict_proba

    if not val_subjects:
        return None, 0.5, {}
    items = ctx.items(val_subjects)
    p_runs = predict_proba(ctx.model, ItemImages(items), ctx.device, ctx.cfg.train.batch_size,
                          amp_dtype(ctx.device, ctx.cfg.train.amp))
    probs = _subject_probs(items, p_runs)
    prior = ctx.opts.calibration_prior_sd if ctx.opts is not None else 1.0
    cal, thr = calibrate_fold(probs, ctx.inputs.labels, prior)
    return cal, thr, probs


def _fold_saliency(ctx: GroupContext, fdir: Path, items) -> dict | None:
    """The fold model's saliency averaged over its test subjects, written under ``fdir`` (rank 0)."""
    from .data import ItemImages
    from .saliency import mean_saliency, write_saliency

    t0 = time.perf_counter()
    try:
        sal = mean_saliency(ctx.model, ItemImages(items), ctx.device)
    except Exception as exc:   # saliency is a report item: a failure must not lose the trained fold
        LOG.warning("saliency for %s failed (%s: %s); left out", fdir.name, type(exc).__name__, exc)
        return None
    path = write_saliency(dv.saliency_map(fdir), sal, ctx.grid, {"Folds": [fdir.name], "Subjects": len(items)})
    LOG.info("%s: saliency of %d test runs in %.1f s", fdir.name, len(items), time.perf_counter() - t0)
    return {"path": path.name, "seconds": time.perf_counter() - t0}


def _subject_probs(items, p_runs) -> dict:
    acc: dict[str, list] = {}
    for it, p in zip(items, p_runs):
        acc.setdefault(it["subject"], []).append(float(p))
    return {s: float(np.mean(v)) for s, v in acc.items()}


def fit_final(ctx: GroupContext) -> dict:
    from .distributed import current

    dist = current()
    fdir = ctx.gdir / "final"
    done = fdir / "final.json"
    saved = dist.on_main(_read_json_if, done, fdir / "adapter.safetensors") if ctx.resume else None
    if saved is not None:
        LOG.info("final model: finished in the interrupted run; skipped")
        return saved
    subjects = ctx.inputs.subjects
    LOG.info("final model: %d labelled subjects (an inner split of them stops and calibrates it)", len(subjects))
    res = _train(ctx, "final", subjects, ctx.cfg.train.seed * 100, fdir)
    cal, thr, _ = _calibration(ctx, res["inner_val"])

    def write() -> dict:                           # rank 0 only
        meta = _save_adapter(ctx, fdir / "adapter.safetensors", subjects, "final", thr, cal)
        out = {"adapter": str(fdir / "adapter.safetensors"), "model_id": meta["model_id"],
               "calibration": cal, "threshold": thr,
               "train_subjects": subjects, "inner_val": res["inner_val"], "best_epoch": res["best_epoch"],
               "epochs_run": res["epochs_run"], "seconds": res["seconds"], "history": res["history"]}
        dv.write_json(done, out)
        return out

    return dist.on_main(write)


def _statistics(ctx: GroupContext, folds, final, subs, y, p, thr, fold_of) -> dict:
    """pooled (with CIs), threshold, calibration, permutation, confounds and saliency entries."""
    from .groupstats import StatsOptions, confound_report, permutation_test, pooled_with_cis, read_confounds
    from .stats import reliability

    opts = ctx.opts or StatsOptions(seed=ctx.cfg.train.seed)
    t0 = time.perf_counter()
    timing: dict = {}                # goes to results["timing"] (what measures time stays there)
    out = {"pooled": pooled_with_cis(y, p, thr, opts.bootstrap, opts.seed), "cv": opts.cv, "_timing": timing}
    out["threshold"] = {"method": "Youden (max sensitivity + specificity) on each fold's inner-validation "
                                  "subjects' calibrated probabilities, ties towards 0.5; never the test fold",
                        "folds": [f.get("threshold", 0.5) for f in folds], "final": final.get("threshold", 0.5)}
    raw = [float(f.get("predictions_uncalibrated", f["predictions"])[s]) for f in folds for s in f["test"]]
    out["calibration"] = {
        "method": f"Platt scaling per fold on its inner-validation subjects, MAP with priors slope ~ N(1, "
                  f"{opts.calibration_prior_sd:g}²), intercept ~ N(0, {opts.calibration_prior_sd:g}²) (few "
                  "subjects: stays near the model's own scores)",
        "folds": [f.get("calibration") for f in folds], "final": final.get("calibration"),
        "brier_uncalibrated": float(np.mean((np.asarray(raw) - np.asarray(y)) ** 2)),
        "reliability": reliability(y, p), "reliability_uncalibrated": reliability(y, raw)}
    fold_vec = [fold_of[subs.index(s)] for s in ctx.inputs.subjects]
    y_all = [ctx.inputs.labels[s] for s in ctx.inputs.subjects]
    if ctx.features is not None:
        t1 = time.perf_counter()
        features = ctx.features
        if opts.harmonize == "combat":
            from .harmonize import harmonized_features
            features, out["harmonization"] = harmonized_features(ctx.features, ctx.inputs, fold_vec)
        out["permutation"] = permutation_test(features, y_all, fold_vec, opts.permutations, opts.seed,
                                              out["pooled"]["auc"])
        timing["permutation_features_seconds"] = ctx.features_seconds
        timing["permutation_seconds"] = time.perf_counter() - t1
    if opts.confounds and ctx.bids_dir is not None:
        table = read_confounds(ctx.bids_dir, ctx.out_root, ctx.inputs.subjects, ctx.inputs.runs, opts.confounds)
        score = [p[subs.index(s)] for s in ctx.inputs.subjects]
        out["confounds"] = confound_report(table, y_all, fold_vec, score, opts.bootstrap, opts.seed) if table \
            else {"columns": [], "alone": {}, "score_vs": {}, "flagged": []}
    out["saliency"] = _group_saliency(ctx, folds)
    if out["saliency"]:
        timing["saliency_fold_seconds"] = [(f.get("saliency") or {}).get("seconds") for f in folds]
    timing["statistics_seconds"] = time.perf_counter() - t0
    return out


def _group_saliency(ctx: GroupContext, folds) -> dict | None:
    """Average of the folds' saliency maps → group/space-<tpl>_desc-saliency_stat.nii.gz; with the
    simulator's truth mask at hand, the inside-effect / WM-outside ratio."""
    import nibabel as nib

    from .saliency import effect_ratio, write_saliency

    paths = [ctx.gdir / f"fold-{f['fold']}" / f["saliency"]["path"] for f in folds if f.get("saliency")]
    paths = [q for q in paths if q.is_file()]
    if not paths:
        return None
    mean = np.mean([np.asarray(nib.load(str(q)).get_fdata()) for q in paths], axis=0)
    path = write_saliency(dv.saliency_map(ctx.gdir), mean, ctx.grid, {"Folds": [q.parent.name for q in paths]})
    out = {"path": path.name, "method": "monai.visualize.VanillaGrad", "folds": len(paths)}
    truth = Path(ctx.bids_dir or ".") / "derivatives" / "truth" / f"space-{dv.TEMPLATE_SPACE}_desc-effect_mask.nii.gz"
    if truth.is_file():
        out["truth_mask"] = str(truth)
        out["effect_ratio"] = effect_ratio(path, truth)
        LOG.info("saliency: mean inside the true effect region / WM outside it = %.2f",
                 out["effect_ratio"]["ratio"])
    return out


def summarise_analysis(ctx: GroupContext, folds: list[dict], final: dict, warning: str | None, seconds: float) -> dict:
    from ..reports.group import write_group_report
    from .metrics import METRIC_KEYS, binary_metrics, roc_points, summarise

    cfg = ctx.cfg
    subs, fold_of, y, p, thr = [], [], [], [], []
    for f in folds:
        for s in f["test"]:
            subs.append(s)
            fold_of.append(f["fold"])
            y.append(int(f["labels"][s]))
            p.append(float(f["predictions"][s]))
            thr.append(float(f.get("threshold", 0.5)))
    extra = _statistics(ctx, folds, final, subs, y, p, thr, fold_of)
    pooled, stats_timing = extra.pop("pooled"), extra.pop("_timing")
    per_fold = [{**{k: f["metrics"][k] for k in METRIC_KEYS}, "n": f["metrics"]["n"], "fold": f["fold"],
                 **{k: f.get(k) for k in ("best_epoch", "epochs_run", "lora_update_rel_norm")}} for f in folds]
    order = np.argsort(subs)
    names = ctx.inputs.class_names
    dv.write_tsv(ctx.gdir / "predictions.tsv", {
        "participant_id": [f"sub-{subs[i]}" for i in order], "fold": [fold_of[i] for i in order],
        "label": [names[y[i]] for i in order], "probability": [p[i] for i in order],
        "threshold": [thr[i] for i in order], "predicted": [names[int(p[i] >= thr[i])] for i in order]})
    rep = ctx.info["parameters"]
    results = {
        "pooled": pooled,
        "folds": per_fold,
        "summary": summarise(per_fold),
        "pretrained": bool(ctx.info.get("pretrained")),
        **({"warning": warning} if warning else {}),
        "config": cfg.to_json_dict(),
        "label_column": ctx.column,
        "class_names": list(ctx.inputs.class_names),
        "n_subjects": len(ctx.inputs.subjects),
        "left_out": {"no_maps": ["sub-" + s for s in ctx.inputs.missing_maps],
                     "no_label": ["sub-" + s for s in ctx.inputs.unlabelled]},
        "inputs": ctx.inputs.selection,
        "excluded": ctx.inputs.excluded,
        "model": {"foundation": cfg.model.foundation, "adaptation": cfg.model.adaptation,
                  "trainable": rep["trainable"], "total": rep["total"],
                  "base_weights": ctx.info.get("sha256") if ctx.info.get("pretrained") else "random-init",
                  "encoder_fingerprint": ctx.fingerprint},
        "final": {"adapter": "final/adapter.safetensors", "model_id": final["model_id"]},
        "timing": {"total_seconds": seconds, "fold_seconds": [f["seconds"] for f in folds],
                   "final_seconds": final["seconds"], "device": str(ctx.device),
                   "processes": _world(),
                   "peak_memory_mb": max([f.get("peak_memory_mb") or 0 for f in folds]) or None,
                   **stats_timing},
        "roc": {"pooled": roc_points(y, p),
                "folds": [roc_points([f["labels"][s] for s in f["test"]], [f["predictions"][s] for s in f["test"]])
                          for f in folds]},
        "versions": package_versions(),
        **extra,
    }
    write_group_report(ctx.gdir, results, folds, final)
    # written last: group/metrics.json marks a finished run (one killed before it is continued by
    # --resume); the checkpoints go first, so a finished run never leaves them behind
    shutil.rmtree(ctx.ckpt_root, ignore_errors=True)
    dv.write_json(ctx.gdir / "metrics.json", results)
    return results

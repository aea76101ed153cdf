"""``bids_adhd BIDS_DIR OUTPUT_DIR group``: cross-validated training of the ADHD classifier.

Steps (each is a function below; see ``docs/group.md`` for the design):

1. inputs: the preset (``--pipeline``, default ``paper``), labels from
   ``participants.tsv`` (``--label-column``, ``--positive``), the template-space
   maps of every subject in OUTPUT_DIR (subjects without maps or without a
   label are listed and left out);
2. subject-level stratified k-fold (``crossval``), written to
   ``group/folds.tsv`` before any training;
3. one model per fold (``train``), its adapter, predictions and metrics under
   ``group/fold-<k>/``; pooled out-of-fold metrics;
4. a final model on every labelled subject (``group/final/adapter.safetensors``);
5. ``group/metrics.json``, ``group/predictions.tsv``, figures and the HTML report.

``--resume`` continues a killed run: finished folds are skipped, an
unfinished one continues from its last epoch checkpoint, with the saved fold
assignment.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same steps run in every process,
with the batches split among them, DistributedDataParallel for the training and
only rank 0 writing; see :mod:`bids_adhd.learn.distributed` and ``docs/deploy.md``.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from .. import derivatives as dv
from ..errors import DataError, MissingInputError, UsageError

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


# --- inputs ------------------------------------------------------------------------

def read_labels(bids_dir: Path, column: str, positive: str) -> tuple[dict[str, int | None], dict, tuple]:
    """subject → 1 (positive) / 0 / None (no label); subject → site; (negative name, positive name)."""
    from ..bids import read_participants

    rows = read_participants(bids_dir)
    header = list(rows[0]) if rows else []
    if column not in header:
        cols = [c for c in header if c != "participant_id"]
        raise DataError(f"participants.tsv has no column {column!r} (columns: {', '.join(cols) or 'none'}); "
                        "pass the diagnosis column with --label-column")
    labels, sites, values = {}, {}, set()
    for r in rows:
        sub = r["participant_id"][4:] if r["participant_id"].startswith("sub-") else r["participant_id"]
        v = r.get(column)
        labels[sub] = None if v is None else int(v == positive)
        sites[sub] = r.get("site")
        if v is not None:
            values.add(v)
    negatives = sorted(values - {positive})
    if positive not in values:
        raise DataError(f"no subject has {column} = {positive!r} in participants.tsv (values: "
                        f"{', '.join(sorted(values)) or 'none'}); one class only: pass the positive class "
                        "with --positive")
    if not negatives:
        raise DataError(f"every labelled subject has {column} = {positive!r}: one class only, nothing to "
                        "classify against")
    negative = negatives[0] if len(negatives) == 1 else f"non-{positive}"
    return labels, sites, (negative, positive)


def bids_subjects(bids_dir: Path) -> list[str]:
    return sorted(p.name[4:] for p in Path(bids_dir).glob("sub-*") if p.is_dir())


def collect_inputs(bids_dir: Path, out_root: Path, column: str, positive: str, folds: int,
                   participant_label=None, pipeline_name: str = "fast") -> GroupInputs:
    from ..bids import clean_labels
    from .crossval import check_class_counts
    from .data import find_template_maps

    labels, sites, class_names = read_labels(bids_dir, column, positive)
    complete, incomplete = find_template_maps(out_root)
    wanted = set(bids_subjects(bids_dir)) | set(labels)
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
    unlabelled = sorted(s for s in with_maps if labels.get(s) is None)
    subjects = [s for s in with_maps if labels.get(s) is not None]
    if missing:
        LOG.warning("%d subject(s) have no template-space maps in %s and are left out: %s (%s)",
                    len(missing), out_root, _few(["sub-" + s for s in missing], 10), hint)
    if unlabelled:
        LOG.warning("%d subject(s) with maps have no %s in participants.tsv and are left out: %s",
                    len(unlabelled), column, _few(["sub-" + s for s in unlabelled], 10))
    if len(subjects) < MIN_SUBJECTS:
        raise MissingInputError(f"only {len(subjects)} labelled subject(s) have template-space maps "
                                f"(missing maps: {_few(['sub-' + s for s in missing]) or 'none'}); "
                                f"the group level needs at least {MIN_SUBJECTS}; {hint}")
    if missing:
        LOG.warning("proceeding with the %d labelled subjects that have maps", len(subjects))
    y = {s: int(labels[s]) for s in subjects}
    check_class_counts([y[s] for s in subjects], folds, class_names, column)
    return GroupInputs(subjects, y, {s: sites.get(s) for s in subjects}, {s: complete[s] for s in subjects},
                       class_names, missing, unlabelled)


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


# --- the run -----------------------------------------------------------------------

def resolve_config(args):
    from ..config import load_pipeline

    cfg = load_pipeline(getattr(args, "pipeline", None) or "paper")
    changes = {}
    if getattr(args, "folds", None) is not None:
        changes["folds"] = int(args.folds)
    if getattr(args, "seed", None) is not None:
        if int(args.seed) < 0:
            raise UsageError(f"--seed must be ≥ 0 (got {args.seed})")
        changes["seed"] = int(args.seed)
    if changes:
        cfg = cfg.replace("train", **changes)
    return cfg


def run_group(args) -> int:
    """The group level; under torchrun one process per GPU (see :mod:`bids_adhd.learn.distributed`)."""
    from .distributed import close, leaving, setup

    dist, device = setup(getattr(args, "device", "auto") or "auto")
    try:
        return _run_group(args, dist, device)
    except BaseException:
        leaving()
        raise
    finally:
        close()


def _run_group(args, dist, device) -> int:
    import torch

    from ..bids import check_bids_dir
    from ..dmri.template import template_grid
    from .adapter import encoder_fingerprint
    from .classifier import build_model
    from .crossval import assign_folds
    from .train import initial_state

    t_run = time.perf_counter()
    with dist.phase():          # every rank; an error on any rank stops them all with its exit code
        bids_dir = check_bids_dir(args.bids_dir)
        out_root = Path(args.output_dir).expanduser().resolve()
        if not out_root.is_dir():
            raise MissingInputError(f"OUTPUT_DIR {args.output_dir} does not exist; run the participant level "
                                    f"first (bids_adhd {args.bids_dir} {args.output_dir} participant)")
        cfg = resolve_config(args)
        if getattr(args, "nprocs", None):
            torch.set_num_threads(int(args.nprocs))
        column = getattr(args, "label_column", "diagnosis") or "diagnosis"
        positive = getattr(args, "positive", "ADHD") or "ADHD"
        inputs = collect_inputs(bids_dir, out_root, column, positive, cfg.train.folds,
                                getattr(args, "participant_label", None), cfg.name)
        # --- the model, built once --------------------------------------------------
        t0 = time.perf_counter()
        torch.manual_seed(cfg.train.seed)
        model, info = build_model(cfg.model, weights=getattr(args, "weights", None))
        fingerprint = encoder_fingerprint(model)
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
        # every rank computes the folds from the seed; they must agree (checked below)
        sites = [inputs.sites[s] for s in inputs.subjects] if cfg.train.stratify_site else None
        computed = assign_folds(inputs.subjects, [inputs.labels[s] for s in inputs.subjects],
                                cfg.train.folds, cfg.train.seed, sites)

    resume = bool(getattr(args, "resume", False))
    progress = not getattr(args, "quiet", False)
    dist.check_same({"subjects": inputs.subjects, "labels": inputs.labels, "encoder": fingerprint,
                     "folds": computed, "pipeline": cfg.to_dict()},
                    "set of subjects, labels, pipeline, encoder weights or fold assignment")
    if dist.enabled:
        LOG.info("torchrun: subjects, labels, encoder and fold assignment identical on all %d ranks", dist.world)
        if cfg.train.batch_size < dist.world * (2 if cfg.train.norm_mode == "train" else 1):
            LOG.warning("torchrun: batch_size %d is too small for %d processes: some get padding only; raise "
                        "batch_size (it is the global batch) or start fewer processes",
                        cfg.train.batch_size, dist.world)
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
        images = _load_images(inputs, cfg, grid)

    ctx = RunContext(cfg=cfg, device=device, model=model, init=init, info=info, fingerprint=fingerprint,
                     grid=grid, inputs=inputs, images=images, gdir=gdir, ckpt_root=ckpt_root,
                     resume=resume, progress=progress, column=column)

    # --- cross-validation --------------------------------------------------------
    fold_results = []
    for k in range(cfg.train.folds):
        fold_results.append(run_fold(ctx, k, assignment))
    # --- final model ---------------------------------------------------------------
    final = run_final(ctx)
    # rank 0 writes (the checkpoints' removal included); the others wait for it
    results = dist.on_main(summarise_run, ctx, fold_results, final, warning, time.perf_counter() - t_run)
    LOG.info("pooled out-of-fold: %s", _fmt_pooled(results["pooled"]))
    if warning:
        LOG.warning(warning)
    LOG.info("group level finished in %.0f s; results in %s (report: %s)", time.perf_counter() - t_run, gdir,
             gdir / "report.html")
    return 0


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
        assignment, saved_labels = read_folds(folds_path, inputs.class_names)
        check_resume_folds(assignment, saved_labels, inputs.labels, cfg.train.folds)
        _check_resume_config(gdir, cfg)
        LOG.info("--resume: reusing the fold assignment in %s", folds_path)
        return gdir, assignment
    if resume:
        LOG.info("--resume: no interrupted run in %s; starting from the beginning", gdir)
    else:
        _clear_previous(gdir)
    dv.write_json(gdir / "config.json", {"pipeline": cfg.to_dict(), "versions": package_versions(),
                                         "label_column": column, "positive": positive,
                                         "class_names": list(inputs.class_names),
                                         "subjects": inputs.subjects, "device": str(device),
                                         "processes": world, "command": sys.argv})
    write_folds(folds_path, computed, inputs.labels, inputs.class_names)
    return gdir, computed


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


def _check_resume_config(gdir: Path, cfg) -> None:
    path = gdir / "config.json"
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())["pipeline"]
    except (ValueError, KeyError):
        return
    now = json.loads(json.dumps(cfg.to_dict(), default=list))
    if saved != now:
        diff = sorted(f"{sec}.{k}" for sec in now if isinstance(now[sec], dict)
                      for k in now[sec] if saved.get(sec, {}).get(k) != now[sec][k])
        raise UsageError(f"--resume: the pipeline differs from the interrupted run's ({_few(diff) or 'name'}); "
                         "use the same --pipeline/--seed or run without --resume")


def _load_images(inputs: GroupInputs, cfg, grid) -> dict:
    """(subject, run key) → input tensor, loaded once and shared by all folds."""
    import torch

    from .data import grid_of, load_input, same_grid

    first = inputs.runs[inputs.subjects[0]][0]
    shape, aff = grid_of(first.fa)
    if not same_grid(shape, aff, *grid):
        LOG.warning("the maps in OUTPUT_DIR are on a %s grid of %.3g mm, the %s pipeline's model reads %s at "
                    "%.3g mm: resampling them (run the participant level with --pipeline %s to avoid this)",
                    "x".join(map(str, shape)), abs(aff[0, 0]), cfg.name, "x".join(map(str, grid[0])),
                    abs(grid[1][0, 0]), cfg.name)
    images = {}
    t0 = time.perf_counter()
    intensity = getattr(cfg.model, "intensity", "none")
    for s in inputs.subjects:
        for rm in inputs.runs[s]:
            images[(s, rm.source.prefix)] = torch.from_numpy(load_input(rm, cfg.model.channels, grid, intensity))
    LOG.info("loaded %d runs of %d subjects (%s, intensity %s) in %.1f s", len(images), len(inputs.subjects),
             "+".join(cfg.model.channels), intensity, time.perf_counter() - t0)
    return images


@dataclass
class RunContext:
    cfg: object
    device: object
    model: object
    init: dict
    info: dict
    fingerprint: str
    grid: tuple
    inputs: GroupInputs
    images: dict
    gdir: Path
    ckpt_root: Path
    resume: bool
    progress: bool
    column: str

    def items(self, subjects) -> list[dict]:
        out = []
        for s in sorted(subjects):
            for rm in self.inputs.runs[s]:
                out.append({"id": f"{s}:{rm.source.prefix}", "subject": s, "label": self.inputs.labels[s],
                            "image": self.images[(s, rm.source.prefix)]})
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


def _train(ctx: RunContext, name: str, subjects: list[str], seed: int, out_dir: Path) -> dict:
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


def _save_adapter(ctx: RunContext, path: Path, subjects, fold: str) -> dict:
    from .adapter import save_adapter

    cfg = ctx.cfg
    return save_adapter(path, ctx.model, foundation=cfg.model.foundation,
                        base_weights=ctx.info.get("sha256") if ctx.info.get("pretrained") else None,
                        init_seed=cfg.train.seed, fingerprint=ctx.fingerprint,
                        pipeline=json.loads(json.dumps(cfg.to_dict(), default=list)), grid=ctx.grid,
                        train_subjects=subjects, class_names=ctx.inputs.class_names,
                        label_column=ctx.column, fold=fold, pretrained=bool(ctx.info.get("pretrained")))


def _read_json_if(path: Path, *also: Path):
    """The JSON at ``path`` if it and every path in ``also`` exist, else None (rank 0 reads, for all)."""
    if path.is_file() and all(p.is_file() for p in also):
        return json.loads(path.read_text())
    return None


def run_fold(ctx: RunContext, k: int, assignment: dict) -> dict:
    from .distributed import current
    from .metrics import binary_metrics, format_metrics
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
    items = ctx.items(test)
    p_run = predict_proba(ctx.model, [it["image"] for it in items], ctx.device, cfg.train.batch_size,
                          amp_dtype(ctx.device, cfg.train.amp))
    probs = _subject_probs(items, p_run)
    y = [ctx.inputs.labels[s] for s in test]
    p = [probs[s] for s in test]
    metrics = binary_metrics(y, p)

    def write() -> dict:                           # rank 0 only; the others wait for its result
        meta = _save_adapter(ctx, fdir / "adapter.safetensors", train, str(k + 1))
        dv.write_tsv(fdir / "predictions.tsv", {"participant_id": [f"sub-{s}" for s in test],
                                               "fold": [k + 1] * len(test),
                                               "label": [ctx.inputs.class_names[v] for v in y],
                                               "probability": [float(v) for v in p]})
        out = {"fold": k + 1, "metrics": metrics, "test": test, "inner_train": res["inner_train"],
               "inner_val": res["inner_val"], "best_epoch": res["best_epoch"], "epochs_run": res["epochs_run"],
               "stopped_early": res["stopped_early"], "seconds": res["seconds"],
               "peak_memory_mb": res["peak_memory_mb"], "model_id": meta["model_id"],
               "predictions": {s: float(probs[s]) for s in test},
               "labels": {s: int(v) for s, v in zip(test, y)}, "history": res["history"]}
        dv.write_json(done, out)                   # written last: the fold is finished
        return out

    out = dist.on_main(write)
    LOG.info("fold %d/%d: %s (%.0f s)", k + 1, cfg.train.folds, format_metrics(metrics), res["seconds"])
    return out


def _subject_probs(items, p_run) -> dict:
    acc: dict[str, list] = {}
    for it, p in zip(items, p_run):
        acc.setdefault(it["subject"], []).append(float(p))
    return {s: float(np.mean(v)) for s, v in acc.items()}


def run_final(ctx: RunContext) -> dict:
    from .distributed import current

    dist = current()
    fdir = ctx.gdir / "final"
    done = fdir / "final.json"
    saved = dist.on_main(_read_json_if, done, fdir / "adapter.safetensors") if ctx.resume else None
    if saved is not None:
        LOG.info("final model: finished in the interrupted run; skipped")
        return saved
    subjects = ctx.inputs.subjects
    LOG.info("final model: training on all %d labelled subjects", len(subjects))
    res = _train(ctx, "final", subjects, ctx.cfg.train.seed * 100, fdir)

    def write() -> dict:                           # rank 0 only
        meta = _save_adapter(ctx, fdir / "adapter.safetensors", subjects, "final")
        out = {"adapter": str(fdir / "adapter.safetensors"), "model_id": meta["model_id"],
               "train_subjects": subjects, "inner_val": res["inner_val"], "best_epoch": res["best_epoch"],
               "epochs_run": res["epochs_run"], "seconds": res["seconds"], "history": res["history"]}
        dv.write_json(done, out)
        return out

    return dist.on_main(write)


def summarise_run(ctx: RunContext, folds: list[dict], final: dict, warning: str | None, seconds: float) -> dict:
    from ..reports.group import write_group_report
    from .metrics import METRIC_KEYS, binary_metrics, roc_points, summarise

    cfg = ctx.cfg
    subs, fold_of, y, p = [], [], [], []
    for f in folds:
        for s in f["test"]:
            subs.append(s)
            fold_of.append(f["fold"])
            y.append(int(f["labels"][s]))
            p.append(float(f["predictions"][s]))
    pooled = binary_metrics(y, p)
    per_fold = [{**{k: f["metrics"][k] for k in METRIC_KEYS}, "n": f["metrics"]["n"], "fold": f["fold"]}
                for f in folds]
    order = np.argsort(subs)
    dv.write_tsv(ctx.gdir / "predictions.tsv", {
        "participant_id": [f"sub-{subs[i]}" for i in order], "fold": [fold_of[i] for i in order],
        "label": [ctx.inputs.class_names[y[i]] for i in order], "probability": [p[i] for i in order]})
    rep = ctx.info["parameters"]
    results = {
        "pooled": pooled,
        "folds": per_fold,
        "summary": summarise(per_fold),
        "pretrained": bool(ctx.info.get("pretrained")),
        **({"warning": warning} if warning else {}),
        "config": json.loads(json.dumps(cfg.to_dict(), default=list)),
        "label_column": ctx.column,
        "class_names": list(ctx.inputs.class_names),
        "n_subjects": len(ctx.inputs.subjects),
        "left_out": {"no_maps": ["sub-" + s for s in ctx.inputs.missing_maps],
                     "no_label": ["sub-" + s for s in ctx.inputs.unlabelled]},
        "model": {"foundation": cfg.model.foundation, "adaptation": cfg.model.adaptation,
                  "trainable": rep["trainable"], "total": rep["total"],
                  "base_weights": ctx.info.get("sha256") if ctx.info.get("pretrained") else "random-init",
                  "encoder_fingerprint": ctx.fingerprint},
        "final": {"adapter": "final/adapter.safetensors", "model_id": final["model_id"]},
        "timing": {"total_seconds": seconds, "fold_seconds": [f["seconds"] for f in folds],
                   "final_seconds": final["seconds"], "device": str(ctx.device),
                   "processes": _world(),
                   "peak_memory_mb": max([f.get("peak_memory_mb") or 0 for f in folds]) or None},
        "roc": {"pooled": roc_points(y, p),
                "folds": [roc_points([f["labels"][s] for s in f["test"]], [f["predictions"][s] for s in f["test"]])
                          for f in folds]},
        "versions": package_versions(),
    }
    write_group_report(ctx.gdir, results, folds, final)
    # written last: group/metrics.json marks a finished run (one killed before it is continued by
    # --resume); the checkpoints go first, so a finished run never leaves them behind
    shutil.rmtree(ctx.ckpt_root, ignore_errors=True)
    dv.write_json(ctx.gdir / "metrics.json", results)
    return results

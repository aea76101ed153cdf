"""Inference with a trained adapter at the participant level (``--model ADAPTER``).

``check_model_file(path)`` runs before any processing: the file must exist
(else ``MissingInputError``, 66) and be a safetensors file carrying bids_adhd
adapter metadata (else ``DataError``, 65). Only the JSON header is read;
nothing is ever unpickled.

``predict_runs(settings, runs, out_root)`` (a ``ParticipantSettings``) runs after the participant workflow:

1. **leakage guard**: subjects the adapter was trained on are refused
   (``UsageError``, 64) unless ``--allow-training-subjects``;
2. rebuilds the base model from the adapter's metadata: the foundation
   manifest and pipeline configuration it names, its weights (``--weights``
   or the usual search; their sha256 must be the adapter's ``base_weights``)
   or, for ``random-init``, the seeded random initialisation; then checks the
   encoder fingerprint, so a prediction never silently runs on another base;
3. loads the adapter tensors and predicts each run from its template-space
   maps (``data.load_input`` with the model's channels and intensity mode). A
   participant level run with another ``--pipeline`` than the model's has its
   maps on another grid: they are resampled onto the model's grid (logged);
4. applies the adapter's calibration (Platt scaling fitted on its inner
   validation subjects) and threshold (chosen there too): ``probability`` is
   the calibrated P(positive), ``probability_uncalibrated`` the model's own
   softmax (the two are equal for adapters without calibration metadata);
5. writes ``<src>_desc-adhd_prediction.json`` beside the run's other outputs.

``predict_participants(settings)`` is what ``cli.py`` calls after the participant
workflow (``participant --model``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from .. import __version__
from .. import derivatives as dv
from ..errors import DataError, MissingInputError, UsageError

LOG = logging.getLogger("bids_adhd.predict")


def check_model_file(path) -> dict:
    """Exists (66), is a bids_adhd adapter in safetensors (65); returns its metadata."""
    from .adapter import read_metadata

    return read_metadata(Path(path).expanduser())


def check_leakage(meta: dict, subjects, allow: bool, model_path="") -> list[str]:
    """Subjects in the adapter's training set: UsageError unless ``allow`` (then a warning)."""
    trained = set(meta.get("train_subjects") or [])
    overlap = sorted(set(subjects) & trained)
    if overlap and not allow:
        raise UsageError(f"{', '.join('sub-' + s for s in overlap[:5])}{' ...' if len(overlap) > 5 else ''} "
                         f"were used to train the model {meta.get('model_id', model_path)}; predicting them would "
                         "leak (optimistic results); select other subjects or pass --allow-training-subjects")
    if overlap:
        LOG.warning("--allow-training-subjects: predicting %d subject(s) the model was trained on (%s); "
                    "these predictions are not an evaluation", len(overlap), ", ".join(overlap[:5]))
    return overlap


def pipeline_from_dict(d: dict):
    """A PipelineConfig from the dict an adapter stores (``PipelineConfig.to_json_dict()``)."""
    from ..config import PipelineConfig

    try:
        return PipelineConfig.from_dict({"name": "adapter", **d}, "adapter pipeline")
    except UsageError as exc:
        raise DataError(f"the adapter's pipeline configuration does not fit this version of bids_adhd "
                        f"({exc}); use the version that trained it") from None


def rebuild_model(meta: dict, weights=None, model_path=""):
    """The classifier the adapter was trained on, base verified, adapter not yet loaded."""
    import torch

    from .classifier import build_model

    cfg = pipeline_from_dict(meta["pipeline"])
    mcfg = cfg.model
    random_init = meta["base_weights"] == "random-init"
    if random_init and mcfg.pretrained:
        mcfg = dataclasses.replace(mcfg, pretrained=False)     # trained on the seeded random init
    torch.manual_seed(int(meta["init_seed"]))
    model, info = build_model(mcfg, weights=None if random_init else weights, fingerprint=True)
    if not random_init:
        if not info.get("pretrained"):
            raise MissingInputError(f"model {meta['model_id']} was trained on {meta['foundation']} weights with "
                                    f"sha256 {meta['base_weights'][:16]}..., which are not found here; pass "
                                    f"--weights PATH or run 'bids_adhd fetch-model {meta['foundation']}'")
        if str(info.get("sha256", "")).lower() != meta["base_weights"].lower():
            raise DataError(f"weights file {info.get('weights_path')} (sha256 {str(info.get('sha256'))[:16]}...) is "
                            f"not the one model {meta['model_id']} was trained on (sha256 "
                            f"{meta['base_weights'][:16]}...); pass the matching --weights")
    fp = info["encoder_fingerprint"]
    if fp != meta["encoder_fingerprint"]:
        raise DataError(f"the base model rebuilt for {model_path or meta['model_id']} does not match the one it was "
                        f"trained on (encoder fingerprint {fp[:12]}... vs {meta['encoder_fingerprint'][:12]}...); "
                        "the weights or the torch/MONAI initialisation differ; use the same weights and versions")
    return model, cfg, info


def predict_participants(settings) -> list[dict]:
    """``participant --model``: predict the runs the participant level selected (called by ``cli.py``
    after the participant workflow)."""
    from ..bids import check_bids_dir, collect_runs

    bids_dir = check_bids_dir(settings.bids_dir)
    out_root = Path(settings.output_dir).expanduser().resolve()
    runs = collect_runs(bids_dir, settings.participant_label, settings.session_label, settings.bids_filter_file)
    return predict_runs(settings, runs, out_root)


def calibration_of(meta: dict) -> dict | None:
    """The adapter's Platt calibration (``calibration`` metadata, JSON), or None (an older adapter)."""
    import json

    raw = meta.get("calibration")
    if not raw:
        return None
    try:
        cal = json.loads(raw) if isinstance(raw, str) else dict(raw)
        return {"slope": float(cal["slope"]), "intercept": float(cal["intercept"]), **cal}
    except (ValueError, KeyError, TypeError):
        raise DataError("the adapter's calibration metadata is corrupt; use the adapter file as written "
                        "by the group level") from None


def predict_runs(settings, runs, out_root) -> list[dict]:
    """Predict every run in ``runs`` with ``settings.model`` (a ``ParticipantSettings``: model, weights,
    device, allow_training_subjects); write one prediction JSON per run."""
    import torch

    from .adapter import load_into, read_adapter
    from .data import grid_of, load_input, run_maps, same_grid
    from .stats import apply_platt
    from .train import amp_dtype, predict_proba, resolve_device

    out_root = Path(out_root)
    model_path = Path(settings.model).expanduser()
    meta = check_model_file(model_path)
    subjects = sorted({r.source.subject for r in runs})
    overlap = set(check_leakage(meta, subjects, settings.allow_training_subjects,
                                model_path))
    missing = []
    for r in runs:
        rm = run_maps(out_root, r.source)
        missing += [p.name for p in (rm.fa, rm.md, rm.mask) if not p.is_file()]
    if missing:
        raise MissingInputError(f"--model: template-space maps missing for prediction ({', '.join(missing[:3])}"
                                f"{' ...' if len(missing) > 3 else ''}); the participant level did not finish")
    tensors, meta = read_adapter(model_path)
    model, cfg, info = rebuild_model(meta, settings.weights, model_path)
    load_into(model, tensors, model_path, meta["format"])
    device = resolve_device(settings.device)
    model.to(device).to(memory_format=torch.channels_last_3d).eval()
    grid = (tuple(meta["grid"]["shape"]), np.asarray(meta["grid"]["affine"], float))
    class_names = list(meta["class_names"])
    threshold = float(meta["threshold"])
    calibration = calibration_of(meta)
    intensity = getattr(cfg.model, "intensity", "none")
    warning = None
    if not meta.get("pretrained"):
        warning = (f"the model's foundation encoder was randomly initialised (no {meta['foundation']} weights when it "
                   "was trained); treat this prediction as a demonstration only")
    out = []
    for r in runs:
        rm = run_maps(out_root, r.source)
        shape, aff = grid_of(rm.fa)
        resampled = not same_grid(shape, aff, *grid)
        if resampled:
            LOG.warning("%s: maps on a %s grid, the model reads %s (pipeline %s): resampling to the model grid; "
                        "run the participant level with --pipeline %s to avoid this", r.source.prefix,
                        "x".join(map(str, shape)), "x".join(map(str, grid[0])), cfg.name, cfg.name)
        x = torch.from_numpy(load_input(rm, cfg.model.channels, grid, intensity))
        raw = float(predict_proba(model, [x], device, 1, amp_dtype(device, cfg.train.amp))[0])
        p = float(apply_platt([raw], calibration)[0])
        label = class_names[1] if p >= threshold else class_names[0]
        rec = {"participant_id": f"sub-{r.source.subject}", "source": r.source.prefix,
               "probability": p, "calibrated": calibration is not None, "probability_uncalibrated": raw,
               "calibration": calibration, "positive_class": class_names[1], "label": label,
               "threshold": threshold,
               "class_names": class_names, "model_id": meta["model_id"], "model_file": str(model_path.resolve()),
               "fold": meta.get("fold"), "foundation": meta["foundation"], "pretrained": bool(meta.get("pretrained")),
               "pipeline": cfg.name, "resampled_to_model_grid": resampled,
               "trained_on_this_subject": r.source.subject in overlap, "bids_adhd_version": __version__}
        if warning:
            rec["warning"] = warning
        dv.write_json(dv.prediction_json(out_root, r.source), rec)
        LOG.info("%s: P(%s) = %.3f -> %s (model %s)", r.source.prefix, class_names[1], p, label, meta["model_id"])
        out.append(rec)
    return out

"""The trained adapter: a small safetensors file that, with the base model, is the classifier.

What the file holds
-------------------
Tensors: ONLY what training changed — the trainable parameters (LoRA
factors, normalisation affine parameters, the head) plus the BatchNorm
running statistics (buffers that training or the ``recalibrate`` norm mode
moved; :func:`bids_adhd.learn.classifier.adapter_state_dict`). For the
``full``/``scratch`` baselines that is the whole network.

Metadata (safetensors ``__metadata__``, strings; JSON where structured):

============================  ==================================================
``format``                    ``bids_adhd-adapter/2`` (:func:`read_adapter` also reads ``/1``)
``model_id``                  ``adhd-<16 hex>``: hash of the tensors + metadata below
``bids_adhd_version``         package version that wrote it
``foundation``                the base model's manifest name (``models/<name>.json``)
``base_weights``              the base weights' sha256, or ``random-init``
``init_seed``                 torch seed the base (and LoRA/head init) was built with
``encoder_fingerprint``       sha256 of the base encoder's weights as built, before
                              training (every encoder parameter outside LoRA, of the
                              whole encoder, also the levels the read-out drops)
``pipeline``                  the resolved pipeline configuration (JSON)
``grid``                      ``{"shape", "affine"}`` of the input grid
``train_subjects``            JSON list of the subject labels it was trained on
``class_names``               JSON ``[negative, positive]``, e.g. ``["TD", "ADHD"]``
``label_column``              participants.tsv column of the labels
``threshold``                 probability threshold for the positive label
``fold``                      ``1`` … ``k`` or ``final``
``pretrained``                ``true``/``false``
============================  ==================================================

Prediction rebuilds the base from ``foundation`` + ``pipeline`` (+ the weights
file, checked against ``base_weights``; or the seeded random init),
recomputes the fingerprint and refuses a mismatch, then loads the tensors.
Nothing is ever unpickled.

Formats: ``/2`` holds tensors of the encoder levels the classifier keeps
(it truncates the encoder after the deepest level its pooling reads).
``/1`` (written before that) may also hold the BatchNorm running statistics
of the dropped levels, which never influenced a prediction; :func:`load_into`
drops exactly those and loads the rest, so a ``/1`` adapter predicts what it
predicted before (``tests/test_classifier.py`` checks this bit for bit).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .. import __version__
from .. import derivatives as dv
from ..errors import DataError, MissingInputError
from .foundation import encoder_fingerprint  # noqa: F401  (re-exported: the adapter's base check)

FORMAT = "bids_adhd-adapter/2"
#: format 1 (before the classifier truncated its encoder): its tensors may include the BatchNorm running
#: statistics of encoder levels past the deepest one read (never used); reading drops them
FORMAT_1 = "bids_adhd-adapter/1"
READABLE = (FORMAT, FORMAT_1)
_JSON_KEYS = ("pipeline", "grid", "train_subjects", "class_names")


def _model_id(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(k.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for k in sorted(meta):
        h.update(f"{k}={meta[k]}".encode())
    return "adhd-" + h.hexdigest()[:16]


def save_adapter(path: os.PathLike, model: nn.Module, *, foundation: str, base_weights: str | None,
                 init_seed: int, fingerprint: str, pipeline: dict, grid: tuple, train_subjects,
                 class_names, label_column: str, threshold: float = 0.5, fold: str = "final",
                 pretrained: bool = False, extra: dict | None = None) -> dict:
    """Write the adapter atomically; returns its metadata (with ``model_id``)."""
    from safetensors.torch import save_file

    from .classifier import adapter_state_dict

    tensors = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}
    shape, affine = grid
    meta = {
        "format": FORMAT,
        "bids_adhd_version": __version__,
        "foundation": str(foundation),
        "base_weights": base_weights or "random-init",
        "init_seed": str(int(init_seed)),
        "encoder_fingerprint": fingerprint,
        "pipeline": json.dumps(pipeline, sort_keys=True, default=list),
        "grid": json.dumps({"shape": [int(s) for s in shape],
                            "affine": np.asarray(affine, float).round(6).tolist()}),
        "train_subjects": json.dumps(sorted(train_subjects)),
        "class_names": json.dumps(list(class_names)),
        "label_column": str(label_column),
        "threshold": repr(float(threshold)),
        "fold": str(fold),
        "pretrained": "true" if pretrained else "false",
    }
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    meta["model_id"] = _model_id(tensors, meta)
    meta["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with dv.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return meta


def read_metadata(path: os.PathLike) -> dict[str, Any]:
    """The adapter's metadata, checked, without loading tensors (JSON fields decoded).

    ``MissingInputError`` (66) if the file does not exist; ``DataError`` (65) if it is
    not safetensors or not a bids_adhd adapter. Never unpickles.
    """
    from .foundation import check_safetensors_header

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"model file {path} not found (--model expects an adapter.safetensors "
                                "written by the group level, e.g. OUTPUT_DIR/group/final/adapter.safetensors)")
    try:
        header = check_safetensors_header(path)
    except DataError:
        raise DataError(f"model file {path} is not a safetensors file; --model expects an adapter.safetensors "
                        "written by 'bids_adhd ... group'") from None
    raw = header.get("__metadata__") or {}
    if not isinstance(raw, dict) or raw.get("format") not in READABLE:
        raise DataError(f"model file {path} is safetensors but not a bids_adhd adapter (no '{FORMAT}' "
                        "metadata); pass OUTPUT_DIR/group/final/adapter.safetensors")
    meta: dict[str, Any] = dict(raw)
    try:
        for k in _JSON_KEYS:
            meta[k] = json.loads(raw[k])
        meta["threshold"] = float(raw.get("threshold", 0.5))
        meta["init_seed"] = int(raw["init_seed"])
        meta["pretrained"] = raw.get("pretrained") == "true"
        for k in ("foundation", "base_weights", "encoder_fingerprint", "model_id"):
            if not raw.get(k):
                raise KeyError(k)
    except (KeyError, ValueError, TypeError) as exc:
        raise DataError(f"model file {path}: adapter metadata is incomplete or corrupt ({exc})") from None
    return meta


def read_adapter(path: os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of an adapter file; see :func:`read_metadata` for the errors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta = read_metadata(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DataError(f"model file {path} is corrupt: {' '.join(str(exc).split())}") from None
    return tensors, meta


def load_into(model: nn.Module, tensors: dict[str, torch.Tensor], path: os.PathLike = "adapter",
              fmt: str = FORMAT) -> None:
    """Load adapter tensors into a rebuilt model; every tensor must fit a parameter or buffer.

    ``fmt`` ``/1``: tensors of encoder modules the classifier truncated away are dropped first.
    """
    if fmt == FORMAT_1 and hasattr(model, "was_truncated"):
        tensors = {k: v for k, v in tensors.items() if not model.was_truncated(k)}
    state = model.state_dict()
    unknown = [k for k in tensors if k not in state]
    wrong = [k for k in tensors if k in state and tuple(state[k].shape) != tuple(tensors[k].shape)]
    if unknown or wrong:
        what = (unknown + wrong)[:3]
        raise DataError(f"model file {path} does not fit the model rebuilt from its metadata "
                        f"({len(unknown)} unknown, {len(wrong)} wrong-shape tensor(s), e.g. {', '.join(what)})")
    model.load_state_dict(tensors, strict=False)

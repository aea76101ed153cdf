"""Shared helpers of the group-level tests (no tests here).

``tiny_build_model`` is a stand-in for ``bids_adhd.learn.classifier.build_model``:
the same classifier class, LoRA and parameter report around a tiny MONAI
SegResEncoder (init_filters 4, two levels), so the training loop, checkpoints,
adapters and prediction run in seconds. The end-to-end test uses the real one.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

GROUP_ARGS = ["--skip-bids-validation"]
TINY_SLEEP = {"seconds": 0.0}


def tiny_build_model(cfg, weights=None, *, fingerprint=False, **kw):
    from monai.networks.nets.segresnet_ds import SegResEncoder

    from bids_adhd.learn.classifier import ADHDClassifier
    from bids_adhd.learn.foundation import encoder_fingerprint
    from bids_adhd.learn.lora import DEFAULT_TARGET, inject_lora, parameter_report

    enc = SegResEncoder(spatial_dims=3, init_filters=4, in_channels=len(cfg.channels), blocks_down=(1, 1))
    names = inject_lora(enc, cfg.lora_target or DEFAULT_TARGET, rank=2, alpha=2.0)
    fp = {"encoder_fingerprint": encoder_fingerprint(enc)} if fingerprint else {}

    class Slow(ADHDClassifier):
        def forward(self, x):
            if TINY_SLEEP["seconds"]:
                time.sleep(TINY_SLEEP["seconds"])
            return super().forward(x)

    model = Slow(enc, pooling=cfg.pooling, head_hidden=8, num_classes=2, head_norm=cfg.head_norm)
    info = {"foundation": "tiny", "pretrained": False, "weights_path": None, "sha256": None,
            "warning": "tiny stand-in, randomly initialised", "adaptation": cfg.adaptation, "lora_layers": names,
            "parameters": parameter_report(model), **fp}
    return model, info


def patch_tiny(monkeypatch):
    import bids_adhd.learn.classifier as classifier

    monkeypatch.setattr(classifier, "build_model", tiny_build_model)


def tiny_pipeline(tmp_path: Path, **train) -> Path:
    """A pipeline YAML: the fast preset with few epochs (and any train overrides)."""
    t = {"epochs": 2, "patience": 2, "head_epochs": 20, "batch_size": 4, "folds": 2, **train}
    text = "base: fast\ntrain:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in t.items())
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def synthetic(tmp_path: Path, n=8, seed=0, effect=0.08, **kw):
    from bids_adhd.config import load_pipeline
    from bids_adhd.simulate_maps import write_synthetic_maps

    bids, out = tmp_path / "bids", tmp_path / "out"
    rows = write_synthetic_maps(out, bids, n_subjects=n, seed=seed, effect=effect,
                                template_cfg=load_pipeline("fast").template, **kw)
    return bids, out, rows


RUNNER = """
import sys, time
sys.path.insert(0, {tests!r})
import test_group_common as c
import bids_adhd.learn.classifier as classifier
classifier.build_model = c.tiny_build_model
c.TINY_SLEEP["seconds"] = {sleep}
from bids_adhd.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def runner_script(tmp_path: Path, sleep: float = 0.0) -> Path:
    path = tmp_path / "run_tiny.py"
    path.write_text(RUNNER.format(tests=str(Path(__file__).parent), sleep=sleep))
    return path

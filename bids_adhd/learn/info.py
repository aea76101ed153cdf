"""``bids_adhd model-info``: the parameter report of a preset.

Builds the architecture only (on PyTorch's ``meta`` device: no weights, no
memory), so it runs anywhere, instantly::

    bids_adhd model-info --pipeline paper
    bids_adhd model-info --pipeline peft-lora --json

``full_finetune`` is what full fine-tuning would train (the encoder, its
adapted stem included, plus the same head); ``full_over_trainable`` is how
many times fewer parameters the preset trains (the seed's "over 113x").
``encoder`` is the whole published encoder's count; ``encoder_run`` the part
that runs (the classifier truncates the encoder after the deepest level its
pooling reads; ``total`` and ``frozen`` count the truncated model).
"""
from __future__ import annotations

import argparse
import json

from ..config import load_pipeline


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default="paper", metavar="NAME|PATH",
                        help="preset name from pipelines/ or a YAML file (default: paper)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def model_report(pipeline: str = "paper") -> dict:
    """The counts ``model-info`` prints, as a dict."""
    from .classifier import build_model  # torch/monai only when needed

    cfg = load_pipeline(pipeline)
    m = cfg.model
    _, info = build_model(m, architecture_only=True)
    rep = info["parameters"]
    full = info["full_finetune_trainable"]
    lora_names = {f"encoder.{n}" for n in info["lora_layers"]}
    lora_per_layer = {k: v for k, v in rep["per_layer"].items() if k in lora_names}
    return {
        "pipeline": cfg.name,
        "foundation": m.foundation,
        "family": info["family"],
        "orientation": info["orientation"],
        "adaptation": m.adaptation,
        "lora_factorisation": m.lora_factorisation if m.adaptation in ("lora", "peft-lora") else None,
        "lora_rank": m.lora_rank if m.adaptation in ("lora", "peft-lora") else None,
        "in_channels": info["in_channels"],
        "pooling": m.pooling,
        "feature_levels": list(m.feature_levels),
        "trainable": rep["trainable"],
        "frozen": rep["frozen"],
        "total": rep["total"],
        "encoder": info["encoder_parameters"],
        "encoder_run": info["encoder_parameters_run"],
        "head": info["head_parameters"],
        "lora": rep["lora"],
        "norm": rep["norm"],
        "full_finetune": full,
        "full_finetune_trainable": full,
        "ratio_to_full": rep["trainable"] / full,
        "full_over_trainable": full / rep["trainable"],
        "lora_layers": len(info["lora_layers"]),
        "lora_per_layer": lora_per_layer,
    }


def format_report(r: dict) -> str:
    lines = [
        f"pipeline {r['pipeline']}: {r['foundation']} encoder ({r['family']}, input {r['orientation']}), "
        f"adaptation {r['adaptation']}"
        + (f" ({r['lora_factorisation']}, rank {r['lora_rank']})" if r["lora_rank"] else "")
        + f", {r['in_channels']} input channel(s), {r['pooling']} pooling"
        + (f" of encoder level(s) {', '.join(map(str, r['feature_levels']))} (deeper levels removed)"
           if r.get("feature_levels") else ""),
        f"  trainable      {r['trainable']:>12,}",
        f"    LoRA         {r['lora']:>12,}",
        f"    norm affine  {r['norm']:>12,}",
        f"    head         {r['head']:>12,}",
        f"  frozen         {r['frozen']:>12,}",
        f"  total          {r['total']:>12,}",
        f"  encoder        {r['encoder']:>12,}  (without LoRA; the whole published encoder)",
    ]
    if r["encoder_run"] != r["encoder"]:
        lines.append(f"    of which run {r['encoder_run']:>12,}  (levels up to the deepest read; the rest is removed)")
    lines += [
        f"  full fine-tuning would train {r['full_finetune']:,}: ratio {100 * r['ratio_to_full']:.2f} % "
        f"({r['full_over_trainable']:.2f}x fewer)",
    ]
    if r["lora_per_layer"]:
        lines.append(f"  LoRA per layer ({r['lora_layers']} layers):")
        width = max(len(k) for k in r["lora_per_layer"])
        lines += [f"    {k:<{width}}  {v:>9,}" for k, v in r["lora_per_layer"].items()]
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    report = model_report(args.pipeline)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0

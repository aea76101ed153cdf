"""GPU benchmark: one training step (forward + backward + AdamW) of the paper
models (both encoders: paper-fmcib and paper-ctfm) with their LoRA against full
fine-tuning (and the other adaptations).

    python benchmarks/gpu_lora.py                      # both presets, their grid (96^3), batch 4, bf16
    python benchmarks/gpu_lora.py --pipelines paper-fmcib --modes lora full --shape 96 112 96

For each pipeline and mode it reports the median step time and the peak GPU memory
(``torch.cuda.max_memory_allocated`` over the timed steps: weights, optimiser
state, activations) and writes ``benchmarks/results/gpu_lora.json``.

The encoder is randomly initialised (weights do not change the cost). Without
a CUDA device the script says so and exits with status 69 (EX_UNAVAILABLE)
without writing anything; ``--cpu-smoke`` runs a tiny CPU version to check
the script itself and also writes nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bids_adhd.config import load_pipeline  # noqa: E402

MODES = {
    # name: changes to the preset's ModelConfig ("lora": the preset's own LoRA, flat on CT-FM, kernel2d on FMCIB)
    "lora": {},
    "full": {"adaptation": "full"},
    "peft-lora": {"adaptation": "peft-lora", "lora_factorisation": "flat"},
    "lora-flat": {"lora_factorisation": "flat"},
    "lora-kernel2d": {"lora_factorisation": "kernel2d"},
    "linear-probe": {"adaptation": "linear-probe", "train_norm": False},
}
PIPELINES = ("paper-fmcib", "paper-ctfm")
EX_UNAVAILABLE = 69


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipelines", nargs="+", default=list(PIPELINES))
    p.add_argument("--modes", nargs="+", default=["lora", "full", "peft-lora", "linear-probe"], choices=list(MODES))
    p.add_argument("--shape", nargs=3, type=int, default=None, metavar=("X", "Y", "Z"),
                   help="input grid (default: the paper preset's template shape, now 96 96 96)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default="bf16")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_lora.json"))
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run 1 step of each mode on the CPU at 16^3, batch 2, to check the script; writes nothing")
    return p.parse_args(argv)


def build(mode: str, pipeline: str = "paper-fmcib"):
    from bids_adhd.learn.classifier import build_model

    cfg = dataclasses.replace(load_pipeline(pipeline).model, pretrained=False, **MODES[mode])
    model, info = build_model(cfg)
    return model, info


def bench_mode(mode: str, args, device: torch.device, pipeline: str = "paper-fmcib") -> dict:
    model, info = build(mode, pipeline)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    shape = tuple(args.shape)
    x = torch.randn(args.batch, 1, *shape, device=device)
    y = torch.randint(0, 2, (args.batch,), device=device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16" and device.type == "cuda")
    cuda = device.type == "cuda"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    rep = info["parameters"]
    out = {
        "pipeline": pipeline,
        "foundation": info["foundation"],
        "mode": mode,
        "adaptation": model_cfg_adaptation(mode),
        "trainable_parameters": rep["trainable"],
        "total_parameters": rep["total"],
        "step_time_s_median": statistics.median(times),
        "step_time_s_mean": statistics.fmean(times),
        "step_time_s_min": min(times),
        "steps": len(times),
    }
    if cuda:
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        out["memory_before_step_gib"] = static / 2 ** 30
    del model, opt, x, y
    if cuda:
        torch.cuda.empty_cache()
    return out


def lora_vs_full(results: list[dict]) -> dict:
    """LoRA over full fine-tuning: step time, peak memory, trainable parameters (when both ran)."""
    by_mode = {r["mode"]: r for r in results if "error" not in r}
    if "lora" not in by_mode or "full" not in by_mode:
        return {}
    lo, fu = by_mode["lora"], by_mode["full"]
    out = {"lora_over_full_step_time": lo["step_time_s_median"] / fu["step_time_s_median"],
           "lora_over_full_trainable": lo["trainable_parameters"] / fu["trainable_parameters"]}
    if "peak_memory_gib" in lo:
        out["lora_over_full_peak_memory"] = lo["peak_memory_gib"] / fu["peak_memory_gib"]
    return out


def model_cfg_adaptation(mode: str) -> str:
    return MODES[mode].get("adaptation", "lora")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        args.shape, args.batch, args.steps, args.warmup, args.amp = [16, 16, 16], 2, 1, 0, "none"
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("gpu_lora: no CUDA device available; this benchmark needs a GPU and wrote nothing "
                  "(--cpu-smoke checks the script on the CPU)", file=sys.stderr)
            return EX_UNAVAILABLE
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
    results, summary = [], {}
    shape_from_preset = args.shape is None
    for pipeline in args.pipelines:
        if shape_from_preset:
            args.shape = list(load_pipeline(pipeline).template.shape)
        for mode in args.modes:
            try:
                r = bench_mode(mode, args, device, pipeline)
            except torch.cuda.OutOfMemoryError:
                r = {"pipeline": pipeline, "mode": mode, "error": "out of GPU memory"}
                torch.cuda.empty_cache()
            results.append(r)
            print(json.dumps(r), flush=True)
        summary[pipeline] = lora_vs_full([r for r in results if r.get("pipeline") == pipeline])
    print(json.dumps(summary))
    if args.cpu_smoke:
        print("gpu_lora: CPU smoke run done; nothing written", file=sys.stderr)
        return 0

    import monai

    record = {
        "benchmark": "gpu_lora",
        "what": "one training step (forward + backward + AdamW step) of each paper classifier, random init",
        "pipelines": args.pipelines,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "monai": monai.__version__,
        "python": platform.python_version(),
        "input_shape": [args.batch, 1, *args.shape],
        "amp": args.amp,
        "warmup_steps": args.warmup,
        "results": results,
        "summary": summary,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Real training steps of a random-initialized FLUX (full size on a GPU) beside the planner's estimate.

    python benchmarks/gpu_flux_memory.py                       # FLUX.1-dev, bf16, cuda: the paper's three settings
    python benchmarks/gpu_flux_memory.py --config flux-tiny --device cpu --lora-resolution 128 --resolution 64 \
        --text-tokens 16 --steps 2                             # the CPU smoke run tests/plan_cost runs

Runs, in one process: LoRA on every block at --lora-resolution (512), and block skipping at 30% and 50%
at --resolution (256), each with the project's own SkipTrainer (CUDA autocast bf16, LoRA fp32, AdamW),
only the kept blocks materialized, as `blockskip train` loads them. Measured peak: on CUDA
torch.cuda.max_memory_allocated over the steps (weights included, as in `train()`'s metrics); on CPU the
allocator timeline of a steady-state step (plan_cost/measure.py). Then the estimate of the same setting
and the ratio. The GPU machine has torch/peft/transformers but not diffusers: carry a diffusers wheel
(`pip download diffusers==0.42.1 --no-deps`) and `pip install --no-deps` it there first.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blockskip_ray.plan_cost.estimate import (  # noqa: E402
    GIB, EstimateSpec, build_trainer, estimate, model_config, resolve_skip, step_inputs, to_fake, warm_optimizer)
from blockskip_ray.plan_cost.measure import profiled_peak, resident_bytes  # noqa: E402


def real_run(spec: EstimateSpec, device: torch.device, steps: int, seed: int = 0) -> dict:
    """`steps` real training steps; returns the measured peak (bytes) and steps/s after the first step."""
    family, cfg, vae = model_config(spec.model)
    skip = resolve_skip(spec, cfg["num_layers"] + (cfg.get("num_single_layers", 0) if family == "flux" else 0))
    trainer = build_trainer(family, cfg, skip, spec, vae)  # meta: kept blocks only, LoRA + AdamW
    g = torch.Generator(device).manual_seed(seed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as personalize.train loads weights
    to_fake(trainer, dtype, lambda shape, dt: (torch.randn(shape, generator=g, device=device) * 0.02).to(dt))
    trainer.device = device  # the trainer's own autocast (CUDA only) and AdamW defaults: nothing modeled
    hg = torch.Generator().manual_seed(seed)
    text, feats = step_inputs(family, cfg, spec, skip, vae, lambda shape, dt: torch.randn(shape, generator=hg).to(dt))
    feats["sigma"] = torch.rand(feats["sigma"].shape, generator=hg)
    if "prompt_mask" in text:
        text["prompt_mask"] = torch.ones_like(text["prompt_mask"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.train_step(text, feats)  # the first step creates AdamW's state; time the rest
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    if device.type == "cuda":
        for _ in range(steps):
            trainer.train_step(text, feats)
        sync()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        warm_optimizer(trainer)  # no-op on state that exists; keeps the measured step steady-state
        base = resident_bytes(trainer)
        peak = base + profiled_peak(lambda: trainer.train_step(text, feats))
        for _ in range(steps - 1):
            trainer.train_step(text, feats)
    elapsed = time.perf_counter() - t0
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"peak": peak, "steps_per_s": steps / elapsed if elapsed > 0 else float("nan")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="flux-dev", help="a config name (flux-dev, flux-tiny, ...)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lora-resolution", type=int, default=512)
    ap.add_argument("--resolution", type=int, default=256, help="block-skip training resolution (s_min)")
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the first")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    target = "cuda" if device.type == "cuda" else "cpu"
    runs = [("LoRA", dict(mode="lora", resolution=args.lora_resolution)),
            ("blockskip 30%", dict(mode="blockskip", skip_ratio=0.3, resolution=args.resolution)),
            ("blockskip 50%", dict(mode="blockskip", skip_ratio=0.5, resolution=args.resolution))]
    rows = []
    for name, kw in runs:
        spec = EstimateSpec(model=args.config, text_tokens=args.text_tokens, rank=args.rank, target=target, **kw)
        est = estimate(spec)
        real = real_run(spec, device, args.steps)
        rows.append((f"{name} {kw['resolution']}", est["skip"], real["peak"] / GIB, est["peak_memory_gib"],
                     est["peak_memory_gib"] * GIB / real["peak"], real["steps_per_s"], est["tflops_per_step"]))
    print(f"# {args.config} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"text {args.text_tokens} tokens, rank {args.rank}, torch {torch.__version__}")
    print("# command: python benchmarks/gpu_flux_memory.py " + " ".join(sys.argv[1:] if argv is None else argv))
    head = f"{'run':<20}{'skip':>8}{'measured GiB':>14}{'estimate GiB':>14}{'est/meas':>10}{'steps/s':>10}{'TFLOPs':>10}"
    print(head)
    for name, skip, meas, est_gib, ratio, sps, tf in rows:
        print(f"{name:<20}{f'{skip[0]},{skip[1]}':>8}{meas:>14.4f}{est_gib:>14.4f}{ratio:>10.3f}{sps:>10.2f}{tf:>10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

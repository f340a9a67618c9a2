"""CPU benchmark: a FLUX-shaped model (all 57 blocks, reduced width) — lora at the 512-equivalent resolution
vs blockskip 30% and 50% at the 256-equivalent — median step time and peak memory, each configuration in
its own process, side by side with ratios to lora.

    python benchmarks/cpu_step_memory.py [--dim 128] [--steps 6] [--out /tmp/bench-cpu]

Features are precomputed in one process and read from safetensors by each training process, so a training
process holds only what `blockskip train`'s trainer holds (kept blocks, embedders, head, features).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [("lora", "lora", 512, None), ("blockskip-30%", "blockskip", 256, 0.3), ("blockskip-50%", "blockskip", 256, 0.5)]


def build_model(out: Path, dim: int) -> None:
    from diffusers import FluxTransformer2DModel

    from blockskip_ray.models.configs import FLUX_DEV
    from blockskip_ray.models.tiny import build_flux_pipeline

    pipe = build_flux_pipeline(0)
    head_dim = 64
    cfg = {**FLUX_DEV, "attention_head_dim": head_dim, "num_attention_heads": dim // head_dim, "joint_attention_dim": 32,
           "pooled_projection_dim": 32, "axes_dims_rope": (16, 24, 24)}
    pipe.transformer = FluxTransformer2DModel(**cfg)
    pipe.register_modules(transformer=pipe.transformer)
    pipe.save_pretrained(out)


def spec_for(name: str, mode: str, res: int, ratio, work: Path, steps: int):
    from blockskip_ray.method.personalize import TrainSpec
    from blockskip_ray.method.trainer import OptimConfig

    return TrainSpec(model=str(work / "model"), images=str(work / "subject"), prompt="a photo of sks toy",
                     out=str(work / name), mode=mode, skip_ratio=ratio, steps=steps, resolution=res,
                     max_text_tokens=64, num_samples=0, device="cpu", optim=OptimConfig(rank=16))


def precompute_phase(name: str, mode: str, res: int, ratio, work: Path, steps: int) -> None:
    from safetensors.torch import save_file

    from blockskip_ray.method.personalize import precompute, prepare

    spec = spec_for(name, mode, res, ratio, work, steps)
    _, images, plan, skip = prepare(spec, log=lambda s: None)
    text, feats = precompute(spec, images, plan, skip, __import__("torch").device("cpu"), progress=False)
    d = work / name / "features"
    d.mkdir(parents=True, exist_ok=True)
    save_file(text, str(d / "text.safetensors"))
    for step, f in feats:
        save_file(f, str(d / f"{step:06d}.safetensors"))
    (d / "skip.json").write_text(json.dumps(skip))


def rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def train_phase(name: str, mode: str, res: int, ratio, work: Path, steps: int) -> None:
    import torch
    from safetensors.torch import load_file

    from blockskip_ray.method.modes import get_mode
    from blockskip_ray.method.personalize import num_blocks
    from blockskip_ray.method.trainer import SkipTrainer
    from blockskip_ray.models.loading import load_kept_transformer

    torch.set_num_threads(1)
    spec = spec_for(name, mode, res, ratio, work, steps)
    d = work / name / "features"
    text = load_file(str(d / "text.safetensors"))
    feats = [load_file(str(p)) for p in sorted(d.glob("0*.safetensors"))]
    skip = tuple(json.loads((d / "skip.json").read_text()))
    base_rss = rss_now()
    N = num_blocks(spec.model)
    kept = range(skip[0], N - skip[1])
    t, st = load_kept_transformer(spec.model, [i for i in range(N) if i not in kept])
    tr = SkipTrainer(t, st, skip, get_mode(mode), spec.optim)
    times = []
    for f in feats:
        t0 = time.perf_counter()
        tr.train_step(text, f)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"name": name, "skip": list(skip), "median_step_s": statistics.median(times[1:]),
                      "peak_rss": peak, "peak_above_start": peak - base_rss, "trainable": sum(p.numel() for p in tr.params)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-cpu"))
    ap.add_argument("--phase", choices=["precompute", "train"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.dim < 64 or a.dim % 64:
        ap.error(f"--dim must be a positive multiple of 64 (the head dim), got {a.dim}")
    if a.phase:
        cfg = next(c for c in CONFIGS if c[0] == a.config)
        (precompute_phase if a.phase == "precompute" else train_phase)(*cfg, a.out, a.steps)
        return
    from blockskip_ray.method.images import make_synthetic_subject

    a.out.mkdir(parents=True, exist_ok=True)
    built = a.out / "model" / "transformer" / "config.json"
    if built.exists():
        c = json.loads(built.read_text())
        if c["num_attention_heads"] * c["attention_head_dim"] != a.dim:
            sys.exit(f"{a.out}/model has width {c['num_attention_heads'] * c['attention_head_dim']}, not --dim {a.dim}: "
                     f"use another --out or delete it")
    else:
        build_model(a.out / "model", a.dim)
    make_synthetic_subject(a.out / "subject", n=4, size=512)
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, *_ in CONFIGS:
        base = [sys.executable, __file__, "--out", str(a.out), "--steps", str(a.steps), "--config", name]
        for phase in ("precompute", "train"):
            res = subprocess.run(base + ["--phase", phase], env=env, capture_output=True, text=True)
            if res.returncode:
                sys.exit(f"{name} {phase} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    lora = rows[0]
    print(f"FLUX-shaped model: 57 blocks, width {a.dim}; {a.steps} steps per config (median of steps 2..), 1 thread each")
    print(f"{'config':<15}{'skip':>8}{'step s':>9}{'x lora':>8}{'peak RSS MiB':>14}{'x lora':>8}{'peak-start MiB':>16}{'x lora':>8}")
    for r in rows:
        print(f"{r['name']:<15}{str(tuple(r['skip'])):>8}{r['median_step_s']:>9.3f}{r['median_step_s'] / lora['median_step_s']:>8.2f}"
              f"{r['peak_rss'] / 2**20:>14.0f}{r['peak_rss'] / lora['peak_rss']:>8.2f}"
              f"{r['peak_above_start'] / 2**20:>16.0f}{r['peak_above_start'] / lora['peak_above_start']:>8.2f}")
    print(f"command: python benchmarks/cpu_step_memory.py --dim {a.dim} --steps {a.steps}")


if __name__ == "__main__":
    main()

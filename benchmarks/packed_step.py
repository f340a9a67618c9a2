"""CPU benchmark: subject-steps per second of packed steps (K subjects per forward/backward) against the same
K subjects trained one after another, on the 57-block FLUX-shaped model at reduced width.

    python benchmarks/packed_step.py [--dim 128] [--resolution 256] [--text-tokens 512] [--ks 1,2,4,8] [--steps 3]

The model is FLUX.1-dev's block structure (19 double + 38 single blocks) at width --dim, built in memory as
benchmarks/cpu_step_memory.py builds it; skip 30% (default split 9,8). Inputs are random tensors with the
shapes FeatureComputer gives at --resolution and --text-tokens (the step's cost does not depend on their
values). "one after another" is SkipTrainer's step (what a subject costs alone, K times); "packed" is one
PackedTrainer step over K subjects. Median step time of --steps steps after one warm-up step.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time


def build(dim: int):
    from diffusers import FluxTransformer2DModel

    from blockskip_ray.models.configs import FLUX_DEV

    import torch

    torch.manual_seed(0)
    cfg = {**FLUX_DEV, "attention_head_dim": 64, "num_attention_heads": dim // 64, "joint_attention_dim": 32,
           "pooled_projection_dim": 32, "axes_dims_rope": (16, 24, 24)}
    return FluxTransformer2DModel(**cfg).requires_grad_(False)


def inputs(dim: int, res: int, lt: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    grid = res // 8
    tokens = (grid // 2) ** 2
    text = {"prompt_embeds": r(1, lt, 32), "pooled": r(1, 32)}
    feats = {"h": r(1, tokens, dim), "e": r(1, lt, dim), "delta": r(1, tokens, dim), "target": r(1, tokens, 64),
             "sigma": torch.rand(1, generator=g), "latent_hw": torch.tensor([grid, grid])}
    return text, feats


def timed(fn, steps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    if a.dim < 64 or a.dim % 64:
        ap.error(f"--dim must be a positive multiple of 64 (the head dim), got {a.dim}")
    ks = [int(k) for k in a.ks.split(",")]

    import torch

    from blockskip_ray.method.modes import default_split, get_mode
    from blockskip_ray.method.packed import PackedTrainer
    from blockskip_ray.method.trainer import OptimConfig, SkipTrainer
    from blockskip_ray.models.loading import strip_blocks
    from blockskip_ray.models.stack import make_stack

    torch.set_num_threads(a.threads)
    base = build(a.dim)
    n_blocks = make_stack(base).num_blocks
    skip = default_split(0.3, n_blocks)
    strip_blocks(base, [i for i in range(n_blocks) if i not in range(skip[0], n_blocks - skip[1])])
    cfg, mode = OptimConfig(rank=16), get_mode("blockskip")
    data = [inputs(a.dim, a.resolution, a.text_tokens, s) for s in range(max(ks))]

    t = copy.deepcopy(base)
    single = SkipTrainer(t, make_stack(t), skip, mode, cfg)
    t_one = timed(lambda: single.train_step(*data[0]), a.steps)
    del single, t
    rows = []
    for k in ks:
        t = copy.deepcopy(base)
        pk = PackedTrainer(t, make_stack(t), skip, mode, cfg, slots=k)
        for i in range(k):
            pk.add(f"s{i}", i)
        batch = {f"s{i}": data[i] for i in range(k)}
        rows.append((k, timed(lambda: pk.step(batch), a.steps)))
        del pk, t
    print(f"machine: {platform.node()} ({os.cpu_count()} CPUs), torch {torch.__version__}, {a.threads} thread(s); "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"FLUX-shaped model: {n_blocks} blocks, width {a.dim}, skip {skip[0]},{skip[1]}, {a.resolution} px "
          f"({(a.resolution // 16) ** 2} image tokens), {a.text_tokens} text tokens, rank 16, fp32 CPU; "
          f"median of {a.steps} steps after a warm-up")
    print(f"{'K':>3}{'packed step s':>15}{'packed subj-steps/s':>21}{'one after another':>19}{'packed / sequential':>21}")
    for k, tp in rows:
        print(f"{k:>3}{tp:>15.3f}{k / tp:>21.3f}{1 / t_one:>19.3f}{(k / tp) * t_one:>20.2f}x")
    print(f"command: python benchmarks/packed_step.py --dim {a.dim} --resolution {a.resolution} "
          f"--text-tokens {a.text_tokens} --ks {a.ks} --steps {a.steps} --threads {a.threads}")


if __name__ == "__main__":
    main()

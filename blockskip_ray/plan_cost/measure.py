"""The measured side: the same training step on real tensors, its peak taken from the allocator.

On CPU there is no `max_memory_allocated`, so the peak comes from torch.profiler's memory timeline
(`profile_memory=True`): every allocation and free the c10 allocator made during the step, in order.
It is independent of the estimator's tracker (the profiler hooks the allocator, the tracker watches
op outputs). Peak = what was allocated before the step and lives through it (weights, LoRA, AdamW
state: the step frees none of them) + the highest running sum of allocations minus frees in the step.
On CUDA, `torch.cuda.max_memory_allocated` is used instead (benchmarks/gpu_flux_memory.py).
"""
from __future__ import annotations

from typing import Any

import torch

from .estimate import GIB, EstimateSpec, prepare, warm_optimizer


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def resident_bytes(trainer) -> int:
    """Weights, LoRA, buffers and optimizer state of the trainer (unique storages)."""
    ts = list(trainer.t.parameters()) + list(trainer.t.buffers())
    ts += [v for st in trainer.opt.state.values() for v in st.values() if torch.is_tensor(v)]
    return _storage_bytes(ts)


def profiled_peak(fn) -> int:
    """Highest (allocated - freed) bytes while `fn()` runs on CPU, from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        fn()
    current = peak = 0
    for _, action, _, size in MemoryProfileTimeline(p._memory_profile()).timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


def measure_cpu(spec: EstimateSpec, seed: int = 0) -> dict[str, Any]:
    """Run the step the estimator traces, on real random tensors on this CPU; the measured peak."""
    # target="cuda" here means: bf16 weights + CPU autocast + foreach AdamW on real CPU tensors,
    # i.e. the GPU model's numerics, measured for real.
    g = torch.Generator().manual_seed(seed)
    make = lambda shape, dtype: (torch.randn(shape, generator=g) * 0.02).to(dtype)  # noqa: E731
    pr = prepare(spec, make)
    pr.feats["sigma"] = torch.rand(pr.feats["sigma"].shape, generator=g)
    if "prompt_mask" in pr.text:
        pr.text["prompt_mask"] = torch.ones_like(pr.text["prompt_mask"])
    warm_optimizer(pr.trainer)
    base = resident_bytes(pr.trainer)
    losses: list[float] = []
    delta = profiled_peak(lambda: losses.append(pr.trainer.train_step(pr.text, pr.feats)))
    return {"peak_memory_bytes": base + delta, "peak_memory_gib": (base + delta) / GIB, "resident_bytes": base,
            "step_peak_bytes": delta, "loss": losses[0], "skip": list(pr.skip)}

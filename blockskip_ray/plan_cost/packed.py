"""Packed training memory (K subjects per step) and how many subjects fit one GPU, from two traced steps.

`estimate` traces one real training step on fake tensors. A packed step (method/packed.py) differs from a
batch-K step of one subject only in the LoRA: it holds K stacked adapters with their gradients and AdamW
moments instead of one. So the planner traces the single-subject step at batch 1 and batch 2 and models

    packed_peak(K) = peak(1) + (K - 1) * (activations per sample + state per subject)

where activations per sample = peak(2) - peak(1) (everything else is equal in the two traces: weights, LoRA
and optimizer do not depend on the batch) and state per subject = LoRA fp32 + its gradient + AdamW's two
moments = 16 bytes per trainable parameter (counted whole, although gradients do not exist at the
end-of-forward peak: a conservative bound). All K samples are assumed to be at `resolution` (s_min); larger
dynamic crops add activations for their subjects.

"Today" (one subject per Ray Train worker, `gpus_per_subject` < 1): every worker is its own process with its
own copy of the frozen weights, so a GPU holds floor(capacity / (peak(1) + reserve)) subjects. Packed: one
process, one copy: the largest K with packed_peak(K) + reserve <= capacity. `reserve` is per process
(CUDA context, allocator fragmentation; 1 GiB by default).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from .estimate import GIB, EstimateSpec, estimate

STATE_BYTES_PER_PARAM = 16  # fp32 LoRA weight + fp32 gradient + AdamW exp_avg + exp_avg_sq


def estimate_packed(spec: EstimateSpec, subjects: int, fit_gb: float | None = None,
                    reserve_gib: float = 1.0) -> dict[str, Any]:
    """The single-subject estimate plus the packed peak for `subjects`, and (with `fit_gb`) how many fit."""
    if subjects < 1:
        raise ValueError(f"subjects must be >= 1, got {subjects}")
    if spec.batch_size != 1:
        raise ValueError("--subjects packs one sample per subject: leave --batch-size at 1")
    if fit_gb is not None and fit_gb <= 0:
        raise ValueError(f"fit-gb must be positive, got {fit_gb}")
    if reserve_gib < 0:
        raise ValueError(f"reserve-gib must be >= 0, got {reserve_gib}")
    one = estimate(spec)
    two = estimate(replace(spec, batch_size=2))
    per_sample = two["peak_memory_bytes"] - one["peak_memory_bytes"]
    state = STATE_BYTES_PER_PARAM * one["trainable_params"]
    per_subject = per_sample + state

    def peak(k: int) -> int:
        return one["peak_memory_bytes"] + (k - 1) * per_subject

    out = dict(one)
    out.update({
        "subjects": subjects,
        "packed_peak_memory_gib": peak(subjects) / GIB,
        "packed_peak_memory_bytes": peak(subjects),
        "per_subject_gib": per_subject / GIB,
        "per_subject_activations_gib": per_sample / GIB,
        "per_subject_state_gib": state / GIB,
        "batch2_peak_memory_gib": two["peak_memory_gib"],
    })
    if fit_gb is not None:
        cap = fit_gb * 1e9
        reserve = reserve_gib * GIB
        today = int(cap // (one["peak_memory_bytes"] + reserve))
        room = cap - reserve - one["peak_memory_bytes"]
        packed = 0 if room < 0 else 1 + int(room // per_subject)
        out.update({"fit_gb": fit_gb, "reserve_gib": reserve_gib, "fit_today": today, "fit_packed": packed,
                    "packed_peak_at_fit_gib": peak(packed) / GIB if packed else None})
    return out


def format_packed(r: dict[str, Any]) -> list[str]:
    lines = [f"{'packed, ' + str(r['subjects']) + ' subjects':<22}{r['packed_peak_memory_gib']:>10.2f} GiB  "
             f"(+{r['per_subject_gib']:.3f} GiB per subject: activations {r['per_subject_activations_gib']:.3f}, "
             f"LoRA+grad+AdamW {r['per_subject_state_gib']:.3f})"]
    if "fit_gb" in r:
        lines.append(f"subjects on one {r['fit_gb']:g} GB GPU ({r['reserve_gib']:g} GiB reserve per process): "
                     f"{r['fit_today']} today (one process and weight copy each), {r['fit_packed']} packed "
                     f"(one copy; peak {r['packed_peak_at_fit_gib'] or 0:.2f} GiB)")
    return lines

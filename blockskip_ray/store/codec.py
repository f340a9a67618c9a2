"""Tensor encodings of feature shards: bf16 / fp8 (per-token scale) / as-is.

Also the one bit of safetensors parsing the store does itself: reading the
JSON header to find each tensor's byte range, so checksums cover exactly the
stored bytes.
"""

from __future__ import annotations

import json

import torch

__all__ = ["FP8_MAX", "quantize_fp8", "dequantize_fp8"]

#: Largest finite float8_e4m3fn value; per-token scales map each row's amax to it.
FP8_MAX = 448.0


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype in feature index: {name!r}")
    return dt


# ------------------------------------------------------------------- fp8
def quantize_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token float8_e4m3fn quantization over the last dim.

    Returns ``(q, scale)`` with ``scale = amax(|t|, -1) / 448`` (fp32, shape
    ``[..., 1]``) so that ``q.float() * scale`` approximates ``t``.  Rows that
    are all zero get scale 1 (avoids 0/0).
    """
    if t.ndim < 1:
        raise ValueError("quantize_fp8 needs at least one dimension")
    x = t.detach().to(torch.float32)
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8` (up to fp8 rounding), cast to ``dtype``."""
    return (q.to(torch.float32) * scale.to(torch.float32)).to(dtype)


def encode(name: str, t: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """Stored tensors for one logical tensor: ``{name: stored}`` (+ ``name.scale`` for fp8)."""
    # clone(): safetensors refuses views sharing storage, and we must not keep
    # a reference into the caller's (possibly later mutated) buffers.
    t = t.detach().to("cpu")
    if not t.is_floating_point() or dtype == "fp32":
        return {name: t.contiguous().clone()}
    if t.ndim < 2:
        # 0/1-d tensors (t, sigma, pooled vectors) are tiny and precision-
        # critical (temb is computed from t), so both lossy modes keep them fp32.
        return {name: t.to(torch.float32).contiguous().clone()}
    if dtype == "bf16":
        return {name: t.to(torch.bfloat16).contiguous().clone()}
    q, scale = quantize_fp8(t)
    return {name: q, f"{name}.scale": scale}


def header_offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """Absolute (start, end) byte ranges of each tensor in a safetensors blob."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    base = 8 + n
    return {k: (base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}

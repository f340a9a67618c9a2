"""Transformer configs by name: full-size shapes (FLUX.1-dev/schnell, SANA 1600M/600M) and tiny ones.

Full-size configs mirror the published `transformer/config.json` files so that the planner and the GPU
benchmark build the real shapes with random (or meta) weights; nothing is downloaded.
"""
from __future__ import annotations

from typing import Any

FLUX_DEV: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_SCHNELL: dict[str, Any] = {**FLUX_DEV, "guidance_embeds": False}
SANA_1600M: dict[str, Any] = dict(
    in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
    num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
    caption_channels=2304, mlp_ratio=2.5, sample_size=32, patch_size=1, norm_elementwise_affine=False,
    norm_eps=1e-6,
)
SANA_600M: dict[str, Any] = {
    **SANA_1600M, "num_attention_heads": 36, "num_layers": 28, "num_cross_attention_heads": 16,
    "cross_attention_head_dim": 72, "cross_attention_dim": 1152,
}
# Tiny FLUX keeps FLUX's structure in miniature: 3 double-stream + 6 single-stream blocks, so every kind
# of skip boundary (inside double, at the double/single seam, inside single) can be exercised.
FLUX_TINY: dict[str, Any] = dict(
    patch_size=1, in_channels=64, num_layers=3, num_single_layers=6, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
SANA_TINY: dict[str, Any] = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=6,
    num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
    mlp_ratio=2.5, sample_size=8, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
)

TRANSFORMER_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "flux-dev": ("flux", FLUX_DEV),
    "flux-schnell": ("flux", FLUX_SCHNELL),
    "sana-1600m": ("sana", SANA_1600M),
    "sana-600m": ("sana", SANA_600M),
    "flux-tiny": ("flux", FLUX_TINY),
    "sana-tiny": ("sana", SANA_TINY),
}


def named_config(name: str) -> tuple[str, dict[str, Any]]:
    """(family, transformer config) for a known name; a clear error otherwise."""
    if name not in TRANSFORMER_CONFIGS:
        raise ValueError(f"unknown model {name!r}: expected one of {sorted(TRANSFORMER_CONFIGS)} or a diffusers directory")
    family, cfg = TRANSFORMER_CONFIGS[name]
    return family, dict(cfg)

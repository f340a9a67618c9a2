"""One block-stack view over FLUX and SANA transformers: embed -> blocks in execution order -> head.

The view never copies weights: it calls the diffusers modules in exactly the order their own `forward`
does (diffusers 0.42 `FluxTransformer2DModel.forward`, `SanaTransformer2DModel.forward`), so running
embed, every block and head reproduces `transformer(...)` bit for bit. Skipped blocks may be absent
(replaced by `SkippedBlock`): the view only touches the blocks it is asked to run.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn


class SkippedBlock(nn.Module):
    """Placeholder for a block that is never materialized in the trainer (no parameters)."""

    def forward(self, *args: Any, **kwargs: Any):  # pragma: no cover - must never run
        raise RuntimeError("a skipped block was executed: its features should come from the feature store")


@dataclass
class Cond:
    """Per-step conditioning the frozen embedders need (all batch-first)."""

    latents: torch.Tensor | None  # FLUX: packed (B, L, 64); SANA: (B, C, H, W). None when the state comes from features.
    sigma: torch.Tensor  # (B,) flow-matching time in [0, 1]
    prompt_embeds: torch.Tensor  # FLUX: T5 (B, Lt, D); SANA: Gemma (B, Lt, D)
    pooled: torch.Tensor | None = None  # FLUX: CLIP pooled (B, P)
    prompt_mask: torch.Tensor | None = None  # SANA: (B, Lt)
    guidance: torch.Tensor | None = None  # FLUX-dev: (B,)
    latent_hw: tuple[int, int] = (0, 0)  # latent grid (after VAE, before packing)


@dataclass
class State:
    """The state between blocks: image stream h, text stream e (FLUX), and what every block reads."""

    h: torch.Tensor
    e: torch.Tensor | None
    ctx: dict[str, Any] = field(default_factory=dict)

    def with_(self, **kw: Any) -> "State":
        return replace(self, **kw)


class FluxStack:
    """FLUX.1: the double-stream blocks then the single-stream blocks (N = 19 + 38 for dev/schnell)."""

    family = "flux"
    pixel_multiple = 16  # VAE factor 8 x 2x2 packing: a crop side must be a multiple of 16 px

    def __init__(self, transformer: nn.Module):
        self.t = transformer
        self.n_double = len(transformer.transformer_blocks)
        self.blocks: list[nn.Module] = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_prefix(self, i: int) -> str:
        return f"transformer_blocks.{i}" if i < self.n_double else f"single_transformer_blocks.{i - self.n_double}"

    def context(self, c: Cond) -> dict[str, Any]:
        t, dtype = self.t, self._dtype()
        timestep = c.sigma.to(dtype) * 1000
        if t.config.guidance_embeds:
            g = c.guidance if c.guidance is not None else torch.full_like(c.sigma, 3.5)
            temb = t.time_text_embed(timestep, g.to(dtype) * 1000, c.pooled.to(dtype))
        else:
            temb = t.time_text_embed(timestep, c.pooled.to(dtype))
        hh, ww = c.latent_hw
        img_ids = _flux_image_ids(hh // 2, ww // 2, c.sigma.device, dtype)
        txt_ids = torch.zeros(c.prompt_embeds.shape[1], 3, device=c.sigma.device, dtype=dtype)
        return {"temb": temb, "rope": t.pos_embed(torch.cat((txt_ids, img_ids), dim=0))}

    def embed(self, c: Cond, ctx: dict[str, Any] | None = None) -> State:
        ctx = ctx if ctx is not None else self.context(c)
        h = self.t.x_embedder(c.latents.to(self._dtype()))
        e = self.t.context_embedder(c.prompt_embeds.to(self._dtype()))
        return State(h, e, ctx)

    def run_block(self, i: int, s: State) -> State:
        e, h = self.blocks[i](hidden_states=s.h, encoder_hidden_states=s.e, temb=s.ctx["temb"],
                              image_rotary_emb=s.ctx["rope"], joint_attention_kwargs=s.ctx.get("attn_kwargs"))
        return s.with_(h=h, e=e)

    def head(self, s: State, c: Cond) -> torch.Tensor:
        return self.t.proj_out(self.t.norm_out(s.h, s.ctx["temb"]))

    def _dtype(self) -> torch.dtype:
        return self.t.x_embedder.weight.dtype


class SanaStack:
    """SANA: its transformer blocks (20 for 1600M, 28 for 600M). The text stream is constant across blocks."""

    family = "sana"

    def __init__(self, transformer: nn.Module, vae_scale_factor: int = 32):
        self.t = transformer
        self.blocks: list[nn.Module] = list(transformer.transformer_blocks)
        self.pixel_multiple = vae_scale_factor * transformer.config.patch_size

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_prefix(self, i: int) -> str:
        return f"transformer_blocks.{i}"

    def context(self, c: Cond) -> dict[str, Any]:
        t, dtype = self.t, self._dtype()
        b = c.sigma.shape[0]
        # SanaPipeline passes timesteps in [0, 1000] scaled by config.timestep_scale.
        ts = c.sigma * 1000 * getattr(t.config, "timestep_scale", 1.0)
        timestep, embedded = t.time_embed(ts, batch_size=b, hidden_dtype=dtype)
        # The caption path is frozen and depends only on the prompt: it is part of the context, not the state.
        dim = t.config.num_attention_heads * t.config.attention_head_dim
        e = t.caption_norm(t.caption_projection(c.prompt_embeds.to(dtype)).view(b, -1, dim))
        mask = None
        if c.prompt_mask is not None:
            mask = ((1 - c.prompt_mask.to(dtype)) * -10000.0).unsqueeze(1)
        p = t.config.patch_size
        return {"timestep": timestep, "embedded_timestep": embedded, "e": e, "mask": mask,
                "hw": (c.latent_hw[0] // p, c.latent_hw[1] // p)}

    def embed(self, c: Cond, ctx: dict[str, Any] | None = None) -> State:
        ctx = ctx if ctx is not None else self.context(c)
        return State(self.t.patch_embed(c.latents.to(self._dtype())), None, ctx)

    def run_block(self, i: int, s: State) -> State:
        hh, ww = s.ctx["hw"]
        h = self.blocks[i](s.h, None, s.ctx["e"], s.ctx["mask"], s.ctx["timestep"], hh, ww)
        return s.with_(h=h)

    def head(self, s: State, c: Cond) -> torch.Tensor:
        t = self.t
        h = t.proj_out(t.norm_out(s.h, s.ctx["embedded_timestep"], t.scale_shift_table))
        hh, ww = s.ctx["hw"]
        p = t.config.patch_size
        b = h.shape[0]
        h = h.reshape(b, hh, ww, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, -1, hh * p, ww * p)

    def _dtype(self) -> torch.dtype:
        return self.t.proj_out.weight.dtype


def _flux_image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # FluxPipeline._prepare_latent_image_ids: (row, col) positions of the 2x2-packed latent grid.
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def make_stack(transformer: nn.Module, vae_scale_factor: int | None = None) -> FluxStack | SanaStack:
    name = type(transformer).__name__
    if name == "FluxTransformer2DModel":
        return FluxStack(transformer)
    if name == "SanaTransformer2DModel":
        return SanaStack(transformer, vae_scale_factor or 32)
    raise ValueError(f"unsupported transformer {name}: expected FluxTransformer2DModel or SanaTransformer2DModel")


def run_stack(stack: FluxStack | SanaStack, c: Cond, start: int = 0, stop: int | None = None,
              state: State | None = None) -> State:
    """Run blocks [start, stop) from `state` (or from the embedders when state is None)."""
    s = state if state is not None else stack.embed(c)
    for i in range(start, stack.num_blocks if stop is None else stop):
        s = stack.run_block(i, s)
    return s

"""Precompute, from the frozen model, what the trainer needs for every step (design section 2).

Per step: the leading state after block n-1 (h_n, and e_n for FLUX), the trailing delta
h_N - h_{N-m} on image tokens (paper Sec. 3.3: f'_{i+l} = f'_i + delta f_{i,i+l}), the flow-matching
target (noise - x0), sigma, and the noisy latent when the embedders must run in the trainer.
Per subject: the text conditioning (prompt embeddings, pooled / mask).
"""
from __future__ import annotations

from typing import Iterator

import torch
from PIL import Image

from ..models.stack import Cond, FluxStack, SanaStack, make_stack
from .images import crop_for_row
from .modes import Mode


class FeatureComputer:
    """Holds the frozen pipeline (VAE, text encoders, all blocks); computes features row by row."""

    def __init__(self, pipe, skip: tuple[int, int], mode: Mode, max_text_tokens: int = 512,
                 guidance: float = 3.5):
        self.pipe = pipe
        self.family = "flux" if type(pipe).__name__ == "FluxPipeline" else "sana"
        self.stack: FluxStack | SanaStack = make_stack(pipe.transformer, pipe.vae_scale_factor)
        self.skip, self.mode = skip, mode
        # a model whose tokenizer caps the text length (the toy model: 16) is trained at that length
        from ..models.loading import text_token_limit
        self.max_text_tokens = min(max_text_tokens, text_token_limit(pipe)) if self.family == "flux" else max_text_tokens
        self.guidance = guidance
        self.device = pipe.transformer.device
        self.dtype = pipe.transformer.dtype

    @torch.no_grad()
    def text(self, prompt: str) -> dict[str, torch.Tensor]:
        if self.family == "flux":
            pe, pooled, _ = self.pipe.encode_prompt(prompt=prompt, prompt_2=prompt, device=self.device,
                                                   max_sequence_length=self.max_text_tokens)
            return {"prompt_embeds": pe.float().cpu(), "pooled": pooled.float().cpu()}
        pe, mask, _, _ = self.pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=self.device,
                                                max_sequence_length=self.max_text_tokens, complex_human_instruction=None)
        return {"prompt_embeds": pe.float().cpu(), "prompt_mask": mask.float().cpu()}

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        x = pixels.to(self.device, vae.dtype)
        if self.family == "flux":  # AutoencoderKL: the posterior mean, so features are deterministic
            z = vae.encode(x).latent_dist.mean
            return (z - vae.config.shift_factor) * vae.config.scaling_factor
        return vae.encode(x).latent * vae.config.scaling_factor

    @torch.no_grad()
    def step(self, image: Image.Image, row: dict, text: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x0 = self.encode(crop_for_row(image, row)[None]).float().cpu()
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(row["noise_seed"])))
        sigma = torch.tensor([row["sigma"]], dtype=torch.float32)
        xt, target = (1 - sigma) * x0 + sigma * noise, noise - x0
        hh, ww = x0.shape[-2:]
        if self.family == "flux":  # 2x2 packing, FluxPipeline._pack_latents
            xt, target = pack(xt), pack(target)
        feats = {"target": target, "sigma": sigma, "latent_hw": torch.tensor([hh, ww])}
        n, m = self.skip
        if not self.mode.features or n == 0:
            feats["x_t"] = xt
        if self.mode.features and (n or m):
            c = make_cond(text, feats | {"x_t": xt}, self.guidance, self.device, self.dtype)
            s = self.stack.embed(c)
            N = self.stack.num_blocks
            for i in range(N):
                if i == n and n:
                    feats["h"] = s.h.float().cpu()
                    if s.e is not None:
                        feats["e"] = s.e.float().cpu()
                if i == N - m:
                    h_keep = s.h
                s = self.stack.run_block(i, s)
            if m:
                feats["delta"] = (s.h.float() - h_keep.float()).cpu()
        return feats

    def iter_steps(self, images: list[Image.Image], plan: list[dict], text: dict) -> Iterator[tuple[int, dict]]:
        for row in plan:
            yield row["step"], self.step(images[row["image_index"]], row, text)


def pack(z: torch.Tensor) -> torch.Tensor:
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def make_cond(text: dict[str, torch.Tensor], feats: dict[str, torch.Tensor], guidance: float,
              device: torch.device | str, dtype: torch.dtype) -> Cond:
    """Assemble the embedders' inputs for one step from the subject's text and the step's features."""
    sigma = feats["sigma"].to(device)
    hw = tuple(int(v) for v in feats["latent_hw"])
    mv = lambda k: text[k].to(device, dtype) if k in text else None  # noqa: E731
    x = feats.get("x_t")
    return Cond(latents=None if x is None else x.to(device, dtype), sigma=sigma, prompt_embeds=mv("prompt_embeds"),
                pooled=mv("pooled"), prompt_mask=mv("prompt_mask"),
                guidance=torch.full_like(sigma, guidance), latent_hw=hw)

"""LoRA only in the kept blocks (peft), exported in diffusers' format."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict
from torch import nn

from ..models.stack import FluxStack, SanaStack

# Attention projections, as in diffusers' DreamBooth LoRA scripts for FLUX and SANA.
FLUX_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
SANA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def target_regex(stack: FluxStack | SanaStack, kept: range) -> str:
    prefixes = "|".join(re.escape(stack.block_prefix(i)) for i in kept)
    if stack.family == "flux":
        attn, names = r"attn", FLUX_TARGETS
    else:
        attn, names = r"(?:attn1|attn2)", SANA_TARGETS
    return rf"^(?:{prefixes})\.{attn}\.(?:{'|'.join(re.escape(n) for n in names)})$"


def add_lora(transformer: nn.Module, stack: FluxStack | SanaStack, kept: range, rank: int,
             alpha: float | None = None) -> list[nn.Parameter]:
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if len(kept) == 0:
        raise ValueError("the skip plan leaves no block to train")
    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=target_regex(stack, kept), init_lora_weights=True)
    transformer.add_adapter(cfg)
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:  # LoRA trains in fp32 even when the frozen weights are bf16
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def save_adapter(out_dir: str | Path, family: str, state: dict[str, torch.Tensor], rank: int, alpha: float | None) -> Path:
    """Write OUT/pytorch_lora_weights.safetensors; `pipe.load_lora_weights(out_dir)` loads it."""
    import diffusers

    pipe_cls = getattr(diffusers, {"flux": "FluxPipeline", "sana": "SanaPipeline"}[family])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"r": rank, "lora_alpha": alpha or rank, "target_modules": sorted({k.split(".lora_")[0] for k in state})}
    pipe_cls.save_lora_weights(out, transformer_lora_layers=state, transformer_lora_adapter_metadata=meta)
    return out / "pytorch_lora_weights.safetensors"

"""LoRA only in the kept blocks (peft); the adapter files are written by `adapter_export`."""
from __future__ import annotations

import re

import torch
from peft import LoraConfig, get_peft_model_state_dict
from torch import nn

from ..models.stack import FluxStack, SanaStack

#: `--lora-targets` choices. "attn": the attention projections. "attn+ff": attention plus the feed-forward
#: layers, the default target list of diffusers' examples/dreambooth/train_dreambooth_lora_flux.py
#: (attn.*, ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2). That script matches by suffix,
#: so in FLUX's single-stream blocks it reaches only attn.to_q/k/v (proj_mlp/proj_out stay frozen); so do we.
TARGET_CHOICES = ("attn", "attn+ff")
FLUX_ATTN = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FLUX_FF = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
SANA_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
# SANA's feed-forward is a GLUMBConv: the two pointwise (1x1) convs; the depthwise conv is grouped (no LoRA).
SANA_FF = ("ff.conv_inverted", "ff.conv_point")


def check_targets(targets: str) -> str:
    if targets not in TARGET_CHOICES:
        raise ValueError(f"LoRA targets must be one of {', '.join(TARGET_CHOICES)}, got {targets!r}")
    return targets


def target_regex(stack: FluxStack | SanaStack, kept: range, targets: str = "attn") -> str:
    check_targets(targets)
    prefixes = "|".join(re.escape(stack.block_prefix(i)) for i in kept)
    if stack.family == "flux":
        attn, names, ff = r"attn", FLUX_ATTN, FLUX_FF
    else:
        attn, names, ff = r"(?:attn1|attn2)", SANA_ATTN, SANA_FF
    alts = [rf"{attn}\.(?:{'|'.join(re.escape(n) for n in names)})"]
    if targets == "attn+ff":
        alts.append("|".join(re.escape(n) for n in ff))
    return rf"^(?:{prefixes})\.(?:{'|'.join(alts)})$"


def add_lora(transformer: nn.Module, stack: FluxStack | SanaStack, kept: range, rank: int,
             alpha: float | None = None, targets: str = "attn") -> list[nn.Parameter]:
    """Add one LoRA adapter (scale alpha / rank; alpha defaults to rank, i.e. scale 1) to the kept blocks."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha}")
    if len(kept) == 0:
        raise ValueError("the skip plan leaves no block to train")
    cfg = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=target_regex(stack, kept, targets),
                     init_lora_weights=True)
    transformer.add_adapter(cfg)
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:  # LoRA trains in fp32 even when the frozen weights are bf16
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}

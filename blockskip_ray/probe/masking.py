"""Cross-attention masking probes (paper Sec. 3.3): cut the text -> image path in chosen blocks.

FLUX has no separate cross-attention: every block runs one joint attention over the sequence
[text; image]. "Masking cross-attention" there means image queries may not attend to text keys;
text queries (text -> text, text -> image) and image -> image attention are untouched. Double-stream
blocks get the text length from `encoder_hidden_states`; single-stream blocks receive the already
concatenated sequence, so a forward pre-hook on the block records the text length for the processor.

SANA has a real cross-attention (`attn2`) whose output is added to the image stream as a residual;
masking a block replaces that output with zeros, i.e. removes its contribution exactly.

`masked(transformer, blocks)` installs the probes for the given block indices (the stack's execution
order: FLUX 0..18 double, 19..56 single) and restores the original processors / removes hooks on exit,
also when the body raises.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..models.stack import FluxStack, SanaStack, make_stack

# record(block_index, probs): probs (B, H, L, L) of one attention call, only for tests / inspection.
ProbRecorder = Callable[[int, torch.Tensor], None]


class MaskedFluxAttnProcessor:
    """diffusers 0.42 `FluxAttnProcessor` with image queries blocked from text keys.

    The projections, q/k norms and RoPE are the stock ones (same order), attention runs through
    `F.scaled_dot_product_attention` with a boolean mask. With `record` set the attention is computed
    explicitly from the probabilities handed to `record` (so what is recorded is what is used).
    """

    def __init__(self, block_index: int, record: ProbRecorder | None = None, mask: bool = True):
        self.block_index = block_index
        self.record = record
        self.mask = mask  # False: stock attention (tests compare against it, and record unmasked probabilities)
        self.text_len: int | None = None  # set per call by the single-stream pre-hook

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise ValueError("masked FLUX attention does not combine with an external attention_mask")
        q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.added_kv_proj_dim is not None:  # double-stream: text tokens come separately, prepend them
            eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
            text_len = encoder_hidden_states.shape[1]
        else:
            if self.text_len is None:
                raise RuntimeError("single-stream masking needs the text length (pre-hook not installed)")
            text_len = self.text_len
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        L = q.shape[1]
        allow = torch.ones(L, L, dtype=torch.bool, device=q.device)
        if self.mask:
            allow[text_len:, :text_len] = False  # rows: queries, columns: keys
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
        if self.record is None:
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allow)
        else:
            scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(qh.shape[-1])
            probs = scores.masked_fill(~allow, float("-inf")).softmax(-1)
            self.record(self.block_index, probs.detach())
            out = probs @ vh
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is not None:
            e_out, h_out = out.split_with_sizes([text_len, L - text_len], dim=1)
            h_out = attn.to_out[1](attn.to_out[0](h_out.contiguous()))
            return h_out, attn.to_add_out(e_out.contiguous())
        return out


def _text_len_hook(proc: MaskedFluxAttnProcessor) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        e = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        proc.text_len = e.shape[1]
    return hook


def _zero_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    # SANA adds attn2's output as a residual: zeros remove the block's text contribution exactly.
    return torch.zeros_like(output)


def check_blocks(blocks: set[int], num_blocks: int) -> set[int]:
    bad = sorted(i for i in blocks if not 0 <= int(i) < num_blocks)
    if bad:
        raise ValueError(f"block indices {bad} out of range: the model has {num_blocks} blocks (0..{num_blocks - 1})")
    return {int(i) for i in blocks}


@contextlib.contextmanager
def masked(transformer: nn.Module, blocks: set[int] | frozenset[int], record: ProbRecorder | None = None) -> Iterator[None]:
    """Mask the text -> image attention path of `blocks` (execution-order indices) inside the block."""
    stack = make_stack(transformer)
    blocks = check_blocks(set(blocks), stack.num_blocks)
    undo: list[Callable[[], None]] = []
    try:
        for i in sorted(blocks):
            block = stack.blocks[i]
            if isinstance(stack, FluxStack):
                attn = block.attn
                old = attn.processor
                proc = MaskedFluxAttnProcessor(i, record)
                attn.processor = proc
                undo.append(lambda a=attn, p=old: setattr(a, "processor", p))
                if i >= stack.n_double:
                    h = block.register_forward_pre_hook(_text_len_hook(proc), with_kwargs=True)
                    undo.append(h.remove)
            elif isinstance(stack, SanaStack):
                if block.attn2 is None:
                    raise ValueError(f"SANA block {i} has no cross-attention (attn2) to mask")
                undo.append(block.attn2.register_forward_hook(_zero_output).remove)
        yield
    finally:
        for fn in reversed(undo):
            fn()


__all__ = ["MaskedFluxAttnProcessor", "masked", "check_blocks", "ProbRecorder"]

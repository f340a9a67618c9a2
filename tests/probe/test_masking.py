"""Cross-attention masking on tiny FLUX and SANA transformers (random init, CPU, fp32)."""
from __future__ import annotations

import functools

import pytest
import torch

from blockskip_ray.models.configs import FLUX_TINY, SANA_TINY
from blockskip_ray.models.stack import Cond, make_stack, run_stack
from blockskip_ray.probe.masking import MaskedFluxAttnProcessor, masked

TEXT_LEN = 6


@functools.lru_cache(maxsize=None)  # built once; masked() restores everything it touches
def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    t = FluxTransformer2DModel(**FLUX_TINY).eval()
    g = torch.Generator().manual_seed(1)
    cond = Cond(latents=torch.randn(1, 16, 64, generator=g), sigma=torch.tensor([0.7]),
                prompt_embeds=torch.randn(1, TEXT_LEN, 32, generator=g), pooled=torch.randn(1, 32, generator=g),
                guidance=torch.tensor([3.5]), latent_hw=(8, 8))
    return t, cond


@functools.lru_cache(maxsize=None)
def _sana():
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    t = SanaTransformer2DModel(**SANA_TINY).eval()
    g = torch.Generator().manual_seed(1)
    cond = Cond(latents=torch.randn(1, 4, 4, 4, generator=g), sigma=torch.tensor([0.7]),
                prompt_embeds=torch.randn(1, TEXT_LEN, 32, generator=g), prompt_mask=torch.ones(1, TEXT_LEN),
                latent_hw=(4, 4))
    return t, cond


def _states(t, cond):
    stack = make_stack(t, 4)
    s = stack.embed(cond)
    out = [s]
    for i in range(stack.num_blocks):
        s = stack.run_block(i, s)
        out.append(s)
    return out, stack.head(s, cond)


@pytest.fixture(params=["flux", "sana"])
def model(request):
    return _flux() if request.param == "flux" else _sana()


@torch.no_grad()
def test_masking_no_block_is_exact_and_processors_restored(model):
    t, cond = model
    _, ref = _states(t, cond)
    before = [type(m.processor) for m in t.modules() if hasattr(m, "processor")]
    with masked(t, set()):
        _, out = _states(t, cond)
    assert torch.equal(out, ref)
    with masked(t, {1, 4}):
        _, changed = _states(t, cond)
    assert not torch.allclose(changed, ref)
    assert [type(m.processor) for m in t.modules() if hasattr(m, "processor")] == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in t.modules())
    _, again = _states(t, cond)
    assert torch.equal(again, ref)


@torch.no_grad()
@pytest.mark.parametrize("blocks", [{0}, {2}, {3}, {5, 8}, {2, 3, 4}])
def test_output_changes_only_from_first_masked_block(blocks):
    for t, cond in (_flux(), _sana()):
        n = make_stack(t).num_blocks
        blocks = {b for b in blocks if b < n}
        ref, _ = _states(t, cond)
        with masked(t, blocks):
            got, _ = _states(t, cond)
        first = min(blocks)
        for i in range(first + 1):  # state i is the input of block i
            assert torch.equal(got[i].h, ref[i].h), i
        assert not torch.allclose(got[first + 1].h, ref[first + 1].h)


@torch.no_grad()
@pytest.mark.parametrize("block", [0, 2, 3, 8])
def test_masked_block_image_output_ignores_text(block):
    """Inside a masked block, the image stream no longer depends on the text stream at all."""
    for t, cond in (_flux(), _sana()):
        stack = make_stack(t, 4)
        if block >= stack.num_blocks:
            continue
        s = run_stack(stack, cond, 0, block)
        if stack.family == "flux":
            s2 = s.with_(e=s.e + torch.randn_like(s.e))
        else:
            s2 = s.with_(ctx={**s.ctx, "e": s.ctx["e"] + torch.randn_like(s.ctx["e"])})
        assert not torch.allclose(stack.run_block(block, s).h, stack.run_block(block, s2).h)
        with masked(t, {block}):
            assert torch.allclose(stack.run_block(block, s).h, stack.run_block(block, s2).h, atol=1e-6)
        if stack.family == "flux":  # the text stream itself still reads the (perturbed) text
            with masked(t, {block}):
                assert not torch.allclose(stack.run_block(block, s).e, stack.run_block(block, s2).e)


@torch.no_grad()
@pytest.mark.parametrize("block", [1, 5])  # a double-stream and a single-stream block
def test_flux_attention_probabilities(block):
    t, cond = _flux()
    stack = make_stack(t)
    s = run_stack(stack, cond, 0, block)
    attn = stack.blocks[block].attn
    stock = attn.processor
    ref_out = stack.run_block(block, s)

    def run(mask: bool):
        rec = {}
        proc = MaskedFluxAttnProcessor(block, lambda i, p: rec.setdefault(i, p), mask=mask)
        proc.text_len = TEXT_LEN
        attn.processor = proc
        try:
            out = stack.run_block(block, s)
        finally:
            attn.processor = stock
        return rec[block], out

    p0, out0 = run(mask=False)
    assert torch.allclose(out0.h, ref_out.h, atol=1e-5)  # the re-implemented processor is the stock one
    p1, _ = run(mask=True)
    T = TEXT_LEN
    assert p1.shape[-1] == p1.shape[-2] == T + 16
    assert torch.all(p1[..., T:, :T] == 0)  # image -> text: exactly zero
    assert torch.all(p0[..., T:, :T] > 0)
    assert torch.allclose(p1.sum(-1), torch.ones(()))
    assert torch.allclose(p1[..., :T, :], p0[..., :T, :], atol=1e-6)  # text queries untouched
    renorm = p0[..., T:, T:] / p0[..., T:, T:].sum(-1, keepdim=True)  # image -> image: same logits
    assert torch.allclose(p1[..., T:, T:], renorm, atol=1e-6)


def test_bad_block_index():
    t, _ = _flux()
    with pytest.raises(ValueError, match="out of range"):
        with masked(t, {9}):
            pass

"""The block-stack view reproduces the stock diffusers forward, and loading reads only what is kept."""
import torch
from diffusers import FluxTransformer2DModel, SanaTransformer2DModel

from blockskip_ray.models.configs import FLUX_TINY, SANA_TINY, named_config
from blockskip_ray.models.loading import load_kept_transformer
from blockskip_ray.models.stack import Cond, SkippedBlock, _flux_image_ids, make_stack, run_stack


def test_flux_stack_equals_forward():
    torch.manual_seed(0)
    t = FluxTransformer2DModel(**FLUX_TINY).eval()
    lat, pe, pooled, sigma = torch.randn(2, 16, 64), torch.randn(2, 7, 32), torch.randn(2, 32), torch.rand(2)
    st = make_stack(t)
    assert st.num_blocks == 9 and st.block_prefix(3) == "single_transformer_blocks.0"
    c = Cond(latents=lat, sigma=sigma, prompt_embeds=pe, pooled=pooled, latent_hw=(8, 8))
    with torch.no_grad():
        ref = t(hidden_states=lat, encoder_hidden_states=pe, pooled_projections=pooled, timestep=sigma,
                img_ids=_flux_image_ids(4, 4, "cpu", torch.float32), txt_ids=torch.zeros(7, 3),
                guidance=torch.full((2,), 3.5)).sample
        out = st.head(run_stack(st, c), c)
    assert torch.equal(ref, out)


def test_sana_stack_equals_forward():
    torch.manual_seed(0)
    t = SanaTransformer2DModel(**SANA_TINY).eval()
    lat, pe, sigma = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.rand(2)
    mask = torch.ones(2, 5)
    mask[0, 3:] = 0
    st = make_stack(t, 4)
    c = Cond(latents=lat, sigma=sigma, prompt_embeds=pe, prompt_mask=mask, latent_hw=(8, 8))
    with torch.no_grad():
        ref = t(hidden_states=lat, encoder_hidden_states=pe, timestep=sigma * 1000, encoder_attention_mask=mask).sample
        out = st.head(run_stack(st, c), c)
    assert torch.equal(ref, out)


def test_kept_transformer_never_materializes_skipped_blocks(tiny_flux_dir):
    t, st = load_kept_transformer(tiny_flux_dir, [0, 1, 8])
    assert isinstance(t.transformer_blocks[0], SkippedBlock) and isinstance(t.single_transformer_blocks[5], SkippedBlock)
    names = [n for n, _ in t.named_parameters()]
    assert not any(n.startswith(("transformer_blocks.0.", "transformer_blocks.1.", "single_transformer_blocks.5.")) for n in names)
    assert any(n.startswith("transformer_blocks.2.") for n in names) and any(n.startswith("x_embedder") for n in names)


def test_full_size_configs_have_paper_block_counts():
    _, dev = named_config("flux-dev")
    assert dev["num_layers"] + dev["num_single_layers"] == 57
    assert named_config("sana-1600m")[1]["num_layers"] == 20 and named_config("sana-600m")[1]["num_layers"] == 28

"""The pretraining script on a tiny setting: deterministic, and the result loads with stock FluxPipeline."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from blockskip_ray.models.loading import generation_kwargs
from blockskip_ray.toy.model import TEXT_TOKENS, encode_text, build_pipeline, build_transformer, build_vae
from blockskip_ray.toy.pretrain import PretrainConfig, pretrain

TINY = PretrainConfig(vae_steps=1, vae_batch=2, images=8, steps=3, batch=2, warmup=1, sample_every=0,
                      transformer=dict(num_layers=1, num_single_layers=1))


def test_pretrain_is_deterministic_and_loads_with_stock_pipeline(tmp_path):
    from diffusers import FluxPipeline

    a, b = pretrain(TINY, tmp_path / "a"), pretrain(TINY, tmp_path / "b")
    assert a["loss_every_50"] == b["loss_every_50"]
    wa = load_file(str(tmp_path / "a" / "transformer" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((tmp_path / "a" / "pretrain.json").read_text())["config"]["steps"] == 3
    pipe = FluxPipeline.from_pretrained(str(tmp_path / "a"))
    assert pipe.vae_scale_factor == 4 and pipe.transformer.config.in_channels == 16
    assert generation_kwargs(pipe) == {"max_sequence_length": TEXT_TOKENS}
    im = pipe("a red round toy", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
              **generation_kwargs(pipe)).images[0]
    assert im.size == (32, 32)
    assert json.loads((tmp_path / "a" / "blockskip_toy.json").read_text())["resolution"] == 32


def test_text_encoder_binds_words_to_their_neighbours():
    pipe = build_pipeline(build_vae(), build_transformer(num_layers=1, num_single_layers=1))
    pe, pooled = encode_text(pipe, ["a red round toy with blue ears", "a blue round toy with red ears"])
    assert pe.shape == (2, TEXT_TOKENS, 64)
    # same words, different order: the T5 features differ at the swapped words and at their successors
    assert not torch.allclose(pe[0], pe[1], atol=1e-3)


def test_default_model_has_enough_blocks_for_skip_ratios():
    cfg = build_transformer().config
    assert cfg.num_layers >= 4 and cfg.num_single_layers >= 8
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim

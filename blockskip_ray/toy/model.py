"""The toy FLUX pipeline's components, built locally: tokenizers, frozen text encoders, VAE, transformer.

Text encoders are NOT trained. The T5 encoder is a fixed function whose single layer's relative-position
bias is set so that every token attends to its predecessor: its output at "ears" carries "blue" in
"... with blue ears", so "a red toy with blue ears" and "a blue toy with red ears" differ (FLUX gives text
tokens no position of their own: txt_ids are zero). The T5 tokenizer is word-level (one piece per domain
word, characters as fallback), capped at TEXT_TOKENS. The CLIP encoder (FLUX's pooled vector) is the
random character-level one of models/tiny.py.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..models.tiny import _SPECIALS, _clip_tokenizer
from .domain import VOCAB

TEXT_TOKENS = 16  # T5 sequence length: the tokenizer's model_max_length, used by every generation path
LATENT_CHANNELS = 4
VAE_BLOCKS = (8, 16, 32)  # three levels: VAE factor 4 (FluxPipeline derives it from len(block_out_channels))
TRANSFORMER = dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=4, num_single_layers=8,
                   attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
                   guidance_embeds=False, axes_dims_rope=(4, 6, 6))
T5_DIM = 64


def word_tokenizer():
    """Unigram T5 tokenizer: each domain word is one piece ('\u2581red'); other text falls back to characters."""
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)] + ["\u2581"]
    vocab = [(t, 0.0) for t in _SPECIALS] + [("\u2581" + w, -1.0) for w in VOCAB] + [(c, -10.0) for c in chars]
    tok = T5TokenizerFast(vocab=vocab, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                          model_max_length=TEXT_TOKENS)
    return tok, len(vocab)


def text_encoder_t5(vocab_size: int, seed: int = 1):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=T5_DIM, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
                   eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0)
    model = T5EncoderModel(cfg).eval()
    with torch.no_grad():
        bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight  # (buckets, heads)
        bias.fill_(-8.0)
        bias[1, :] = 8.0  # bucket 1 = relative position -1 (bidirectional buckets): attend to the previous token
        model.encoder.block[0].layer[0].SelfAttention.o.weight.mul_(2.0)  # the predecessor's share, not drowned by FF
    return model.requires_grad_(False)


def text_encoder_clip(vocab_size: int, seed: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=32, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1)).eval().requires_grad_(False)


def build_vae(seed: int = 3):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(VAE_BLOCKS)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=VAE_BLOCKS,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=1, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                         use_post_quant_conv=False, mid_block_add_attention=False)


def build_transformer(seed: int = 4, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    cfg = {**TRANSFORMER, **overrides}
    if sum(cfg["axes_dims_rope"]) != cfg["attention_head_dim"]:
        raise ValueError(f"axes_dims_rope {cfg['axes_dims_rope']} must sum to attention_head_dim {cfg['attention_head_dim']}")
    return FluxTransformer2DModel(**cfg)


def build_pipeline(vae, transformer):
    """Assemble a stock FluxPipeline around a trained VAE and transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    with tempfile.TemporaryDirectory() as tmp:  # CLIPTokenizer only builds from files
        clip_tok = _clip_tokenizer(Path(tmp) / "clip")
    t5_tok, t5_vocab = word_tokenizer()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder_clip(len(clip_tok)),
                        tokenizer=clip_tok, text_encoder_2=text_encoder_t5(t5_vocab), tokenizer_2=t5_tok,
                        transformer=transformer)


@torch.no_grad()
def encode_text(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 embeddings (B, TEXT_TOKENS, D), CLIP pooled (B, P)) exactly as FluxPipeline.encode_prompt makes them."""
    pe, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=prompts, device="cpu", max_sequence_length=TEXT_TOKENS)
    return pe.float(), pooled.float()


__all__ = ["build_pipeline", "build_vae", "build_transformer", "word_tokenizer", "encode_text", "TEXT_TOKENS",
           "TRANSFORMER", "LATENT_CHANNELS"]

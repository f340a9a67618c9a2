"""Build complete tiny diffusers pipelines locally (no hub): the embedded default model.

Every component is random-initialized from a fixed seed and every tokenizer is built from code, so
`FluxPipeline.from_pretrained(out)` / `SanaPipeline.from_pretrained(out)` work offline.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .configs import FLUX_TINY, SANA_TINY

_SPECIALS = ["<pad>", "</s>", "<unk>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable-char table of GPT-2/CLIP BPE (openai/CLIP simple_tokenizer.py).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clip_tokenizer(out: Path):
    """A character-level CLIP BPE tokenizer (no merges): enough to drive the real CLIP code path."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)
    tok.save_pretrained(out)
    return tok


def _char_vocab() -> list[str]:
    return _SPECIALS + [chr(c) for c in range(33, 127)] + ["\u2581"]  # printable ASCII + sentencepiece space


def _t5_tokenizer():
    """A character-level Unigram T5 tokenizer (transformers >= 5 builds it from a vocab list)."""
    from transformers import T5TokenizerFast

    vocab = [(t, 0.0 if t in _SPECIALS else -1.0) for t in _char_vocab()]
    return T5TokenizerFast(vocab=vocab, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0), len(vocab)


def _gemma_tokenizer():
    """A character-level BPE Gemma tokenizer (no merges)."""
    from transformers import GemmaTokenizerFast

    vocab = {t: i for i, t in enumerate(_char_vocab())}
    tok = GemmaTokenizerFast(vocab=vocab, merges=[], pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<bos>")
    tok.padding_side = "right"
    return tok, len(vocab)


def build_flux_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**FLUX_TINY)
    # Four VAE levels keep FLUX's factor 8 (and so 16-px crops: factor 8 x patch 2).
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611,
    )
    with tempfile.TemporaryDirectory() as tmp:  # CLIPTokenizer only builds from files
        clip_tok = _clip_tokenizer(Path(tmp) / "clip")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=32, bos_token_id=len(clip_tok) - 2, eos_token_id=len(clip_tok) - 1,
        pad_token_id=len(clip_tok) - 1,
    ))
    t5_tok, t5_vocab = _t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=clip_tok,
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tok, transformer=transformer,
    )


def build_sana_pipeline(seed: int = 0):
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(**SANA_TINY)
    # Three DC-AE levels: factor 4 at tiny scale (the real DC-AE is factor 32).
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
        decoder_act_fns="silu", scaling_factor=0.41407,
    )
    tok, vocab = _gemma_tokenizer()
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512, pad_token_id=0, bos_token_id=3, eos_token_id=1,
    ))
    return SanaPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))


def init_model(family: str, out: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a complete tiny pipeline to `out` (a diffusers directory)."""
    if size != "tiny":
        raise ValueError(f"unsupported size {size!r}: only 'tiny' can be built locally (full-size weights come from a local directory)")
    builders = {"flux": build_flux_pipeline, "sana": build_sana_pipeline}
    if family not in builders:
        raise ValueError(f"unknown family {family!r}: expected one of {sorted(builders)}")
    out = Path(out)
    pipe = builders[family](seed)
    pipe.save_pretrained(out, safe_serialization=True)
    return out

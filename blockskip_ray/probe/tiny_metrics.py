"""Tiny random-weight DINOv2 and CLIP models built locally (no hub), for tests and the embedded default.

Their embeddings are meaningless as similarity measures (random weights): they exercise the exact code
path of the real models (`facebook/dinov2-*`, `openai/clip-vit-*` saved with `save_pretrained`), nothing
more. Anything that reports numbers from them must say so.
"""
from __future__ import annotations

from pathlib import Path

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TINY_MARKER = "blockskip_tiny_random"  # written into the config so loaders can warn loudly


def build_tiny_dino(out: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=image_size, patch_size=8)
    setattr(cfg, TINY_MARKER, True)
    out = Path(out)
    Dinov2Model(cfg).eval().save_pretrained(out, safe_serialization=True)
    BitImageProcessor(do_resize=True, size={"shortest_edge": image_size}, do_center_crop=True,
                      crop_size={"height": image_size, "width": image_size}, do_normalize=True,
                      image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True).save_pretrained(out)
    return out


def build_tiny_clip(out: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from ..models.tiny import _clip_tokenizer

    out = Path(out)
    tok = _clip_tokenizer(out)  # saves the tokenizer files into `out`
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(tok) - 2,
                         eos_token_id=len(tok) - 1, pad_token_id=len(tok) - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    setattr(cfg, TINY_MARKER, True)
    CLIPModel(cfg).eval().save_pretrained(out, safe_serialization=True)
    CLIPImageProcessor(do_resize=True, size={"shortest_edge": image_size}, do_center_crop=True,
                       crop_size={"height": image_size, "width": image_size}, do_normalize=True,
                       image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True).save_pretrained(out)
    return out

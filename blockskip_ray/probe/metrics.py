"""Personalization metrics (paper Sec. 4): DINO, CLIP-I, CLIP-T.

- DINO: cosine of DINOv2 CLS embeddings (`Dinov2Model` pooler output = final-layernormed CLS token).
- CLIP-I: cosine of CLIP image embeddings (`CLIPModel.get_image_features`, projected).
- CLIP-T: cosine of a generated image's CLIP embedding and its prompt's CLIP text embedding.
Protocol, per subject: for every prompt, `images_per_prompt` generated images; DINO and CLIP-I are the
mean over all (generated, reference) pairs, CLIP-T the mean over generated images of the cosine with
their own prompt. Models load from a local directory or a store URI (downloaded once to a cache dir).

A directory may hold a saved DINOv2 / CLIP (transformers `save_pretrained`) or one of the toy metric models
trained here for the toy domain (toy/metric_models.py; its config.json says `blockskip_toy_metric`): both
give the same embed / images / texts interface, so `blockskip eval` and the probes take either.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..toy.metric_models import load_toy_metric, toy_metric_kind
from .tiny_metrics import TINY_MARKER


def resolve_model_source(source: str | Path, cache_root: str | Path | None = None) -> Path:
    """A local directory as is; `toy:dino` / `toy:clip` the shipped toy metric models; a store URI (s3://...)
    downloaded once into `cache_root`."""
    s = str(source)
    if s.startswith("toy:"):  # the toy metric models shipped in the package (toy:dino, toy:clip)
        from ..toy import toy_model_dir
        return toy_model_dir(s)
    if "://" not in s:
        p = Path(s)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"metric model {p} is not a saved transformers model directory (no config.json)")
        return p
    from ..store import Store

    root = Path(cache_root) if cache_root else Path.home() / ".cache" / "blockskip" / "metric-models"
    local = root / hashlib.sha256(s.encode()).hexdigest()[:16]
    if not (local / "config.json").is_file():
        # download the last path segment from its parent: Store keys may not be empty
        base, _, name = s.rstrip("/").rpartition("/")
        if not name or base.endswith(":/"):
            raise ValueError(f"metric model URI {s!r} must name a folder inside a store, e.g. s3://bucket/models/dino")
        Store.open(base).download_dir(name, local)
    if not (local / "config.json").is_file():
        raise FileNotFoundError(f"metric model {s} has no config.json (is it a saved transformers model?)")
    return local


def is_tiny_random(model_dir: str | Path) -> bool:
    return bool(json.loads((Path(model_dir) / "config.json").read_text()).get(TINY_MARKER))


def _warn_if_tiny(model_dir: Path, what: str) -> None:
    if is_tiny_random(model_dir):
        print(f"WARNING: {what} model {model_dir} is a tiny RANDOM-WEIGHT model: its scores are meaningless "
              "as similarity (they only exercise the code path)", file=sys.stderr, flush=True)


def _toy(d: Path, want: str, what: str):
    """The toy metric model in `d`, or None when `d` holds a transformers model."""
    kind = toy_metric_kind(d)
    if kind is None:
        return None
    if kind != want:
        raise ValueError(f"{what} model {d} is the toy {kind!r} metric model, not the {want!r} one")
    return load_toy_metric(d)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; older ones a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class DinoEmbedder:
    def __init__(self, source: str | Path, device: str | torch.device = "cpu", cache_root: str | Path | None = None):
        from transformers import AutoImageProcessor, Dinov2Model

        d = resolve_model_source(source, cache_root)
        self.dir = d
        self.device = torch.device(device)
        self.toy = _toy(d, "dino", "DINO")
        if self.toy is not None:
            self.model = self.toy.to(self.device)
            return
        _warn_if_tiny(d, "DINO")
        self.processor = AutoImageProcessor.from_pretrained(str(d))
        self.model = Dinov2Model.from_pretrained(str(d)).eval().to(self.device)

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self.toy is not None:
            return self.toy.embed(images)
        px = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return _normalize(self.model(pixel_values=px.to(self.device)).pooler_output).cpu()


class ClipEmbedder:
    def __init__(self, source: str | Path, device: str | torch.device = "cpu", cache_root: str | Path | None = None):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        d = resolve_model_source(source, cache_root)
        self.dir = d
        self.device = torch.device(device)
        self.toy = _toy(d, "clip", "CLIP")
        if self.toy is not None:
            self.model = self.toy.to(self.device)
            return
        _warn_if_tiny(d, "CLIP")
        self.processor = AutoImageProcessor.from_pretrained(str(d))
        self.tokenizer = AutoTokenizer.from_pretrained(str(d))
        self.model = CLIPModel.from_pretrained(str(d)).eval().to(self.device)

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if self.toy is not None:
            return self.toy.images(images)
        px = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return _normalize(_pooled(self.model.get_image_features(pixel_values=px.to(self.device)))).cpu()

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        if self.toy is not None:
            return self.toy.texts(texts)
        tok = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _normalize(_pooled(self.model.get_text_features(**tok))).cpu()


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all pairs of rows of a (n, d) and b (m, d); rows need not be normalized."""
    return float((_normalize(a) @ _normalize(b).T).mean())


@dataclass
class SubjectScores:
    dino: float
    clip_i: float
    clip_t: float
    rows: list[dict]  # one per generated image: prompt, index, dino, clip_i, clip_t


def score_subject(generated: dict[str, list[Image.Image]], references: Sequence[Image.Image],
                  dino: DinoEmbedder, clip: ClipEmbedder) -> SubjectScores:
    """The paper's protocol for one subject: `generated` maps each prompt to its generated images."""
    if not references:
        raise ValueError("no reference images to score against")
    if not generated or not any(generated.values()):
        raise ValueError("no generated images to score")
    ref_dino, ref_clip = dino.embed(references), clip.images(references)
    rows = []
    for prompt, images in generated.items():
        g_dino, g_clip, t = dino.embed(images), clip.images(images), clip.texts([prompt])
        for i in range(len(images)):
            rows.append({"prompt": prompt, "index": i,
                         "dino": mean_pairwise_cosine(g_dino[i:i + 1], ref_dino),
                         "clip_i": mean_pairwise_cosine(g_clip[i:i + 1], ref_clip),
                         "clip_t": float(g_clip[i] @ t[0])})
    # every generated image contributes len(references) pairs, so the pair mean is the mean of per-image means
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("dino", "clip_i", "clip_t")}
    return SubjectScores(mean["dino"], mean["clip_i"], mean["clip_t"], rows)


__all__ = ["DinoEmbedder", "ClipEmbedder", "mean_pairwise_cosine", "score_subject", "SubjectScores",
           "resolve_model_source", "is_tiny_random"]

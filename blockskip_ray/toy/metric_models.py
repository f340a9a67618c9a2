"""Metric models for the toy domain, trained here (design section 8): DINO's and CLIP's roles.

- identity encoder (DINO's role): a small CNN whose embedding is trained to predict every part of a toy
  (shape, colour, pattern, accessory, accessory colour) from images in random scenes, so that its cosine
  similarity measures "same toy" independent of background, position, scale and pose. Reported: retrieval
  accuracy on the held-out identities (never seen in its training).
- text-image scorer (CLIP's role): an image CNN and a text encoder trained contrastively on pretraining
  captions. Text: word + predecessor-word embeddings averaged (so "red toy with blue ears" differs from
  "blue toy with red ears"); words outside the domain vocabulary (e.g. the subject token "sks") are ignored.
  Reported: 10-way caption accuracy on held-out identities and background accuracy.

Saved as a directory with config.json (`blockskip_toy_metric`: "dino" | "clip") and model.safetensors;
probe/metrics.py's DinoEmbedder / ClipEmbedder load such a directory like a saved DINOv2 / CLIP one.

    python -m blockskip_ray.toy.metric_models --out DIR     (writes DIR/dino and DIR/clip; a few minutes)
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .domain import (ACCESSORIES, BACKGROUNDS, COLORS, HELD_OUT, PATTERNS, PRETRAIN_IDENTITIES, SHAPES, VOCAB, Identity,
                     _rng, caption, random_scene, render_toy)

MARKER = "blockskip_toy_metric"
FIELDS = {"shape": SHAPES, "color": tuple(COLORS), "pattern": PATTERNS, "accessory": ACCESSORIES,
          "acc_color": tuple(COLORS)}
IMAGE_SIZE = 32


class ImageCNN(nn.Module):
    def __init__(self, width: int = 32, dim: int = 64):
        super().__init__()
        w = width
        layers, c = [], 3
        for out in (w, 2 * w, 2 * w):  # 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(c, out, 3, stride=2, padding=1), nn.GroupNorm(4, out), nn.SiLU(),
                       nn.Conv2d(out, out, 3, padding=1), nn.SiLU()]
            c = out
        self.conv = nn.Sequential(*layers)
        self.proj = nn.Linear(c * 16, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x).flatten(1))


class TextBigram(nn.Module):
    """mean over words of MLP(emb[word] + emb_prev[previous word]): order-aware enough for this domain."""

    def __init__(self, vocab: Sequence[str], dim: int = 64):
        super().__init__()
        self.vocab = {w: i + 1 for i, w in enumerate(vocab)}  # 0: start of text
        self.emb = nn.Embedding(len(vocab) + 1, dim)
        self.prev = nn.Embedding(len(vocab) + 1, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))

    def ids(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.lower().replace(",", " ").split() if w in self.vocab]

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for t in texts:
            ids = self.ids(t) or [0]
            cur = torch.tensor(ids)
            prev = torch.tensor([0] + ids[:-1])
            out.append(self.mlp(self.emb(cur) + self.prev(prev)).mean(0))
        return torch.stack(out)


def to_tensor(images: Sequence[Image.Image], size: int = IMAGE_SIZE) -> torch.Tensor:
    ims = [im.convert("RGB") if im.size == (size, size) else
           im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC) for im in images]
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in ims])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


# ------------------------------------------------------------------------------------------- loading
class ToyDino(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.image = ImageCNN(cfg["width"], cfg["dim"])
        self.heads = nn.ModuleDict({k: nn.Linear(cfg["dim"], len(v)) for k, v in FIELDS.items()})

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        dev = next(self.parameters()).device
        return F.normalize(self.image(to_tensor(images, self.cfg["image_size"]).to(dev)).float(), dim=-1).cpu()


class ToyClip(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        self.image = ImageCNN(cfg["width"], cfg["dim"])
        self.text = TextBigram(cfg["vocab"], cfg["dim"])
        self.logit_scale = nn.Parameter(torch.tensor(2.6))

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        dev = next(self.parameters()).device
        return F.normalize(self.image(to_tensor(images, self.cfg["image_size"]).to(dev)).float(), dim=-1).cpu()

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        return F.normalize(self.text(texts).float(), dim=-1).cpu()


def toy_metric_kind(model_dir: str | Path) -> str | None:
    cfg = Path(model_dir) / "config.json"
    return json.loads(cfg.read_text()).get(MARKER) if cfg.is_file() else None


def load_toy_metric(model_dir: str | Path) -> ToyDino | ToyClip:
    d = Path(model_dir)
    cfg = json.loads((d / "config.json").read_text())
    kind = cfg.get(MARKER)
    if kind not in ("dino", "clip"):
        raise ValueError(f"{d} is not a toy metric model (config.json {MARKER} must be 'dino' or 'clip')")
    model = (ToyDino if kind == "dino" else ToyClip)(cfg)
    model.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    return model.eval()


def _save(model: nn.Module, cfg: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


# ------------------------------------------------------------------------------------------- training
@dataclass
class MetricConfig:
    seed: int = 0
    images: int = 6000
    steps: int = 600
    batch: int = 64
    lr: float = 2e-3
    width: int = 16
    dim: int = 64
    threads: int = 1


def _dataset(cfg: MetricConfig) -> tuple[torch.Tensor, list[Identity], list[str]]:
    """Pretraining identities only, in random scenes, with (part-dropped) captions."""
    ims, ids, caps = [], [], []
    for i in range(cfg.images):
        rng = _rng("metric", cfg.seed, i)
        ident = PRETRAIN_IDENTITIES[int(rng.integers(len(PRETRAIN_IDENTITIES)))]
        scene = random_scene(rng)
        ims.append(render_toy(ident, scene))
        ids.append(ident)
        keep = {"toy": bool(rng.random() >= 0.1), "background": bool(rng.random() >= 0.1)}
        caps.append(caption(ident, scene, keep))
    return to_tensor(ims), ids, caps


def _labels(ids: Sequence[Identity]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([v.index(getattr(i, k)) for i in ids]) for k, v in FIELDS.items()}


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Blur (down-up sampling) and per-channel gain on random halves of the batch: generated images are
    softer and slightly colour-shifted versions of the rendered ones (the VAE), and must still match them."""
    b = x.shape[0]
    blur = torch.rand(b, generator=g) < 0.5
    if blur.any():
        side = int(torch.randint(12, 26, (1,), generator=g))
        soft = F.interpolate(F.interpolate(x[blur], size=side, mode="bilinear", antialias=True), size=x.shape[-1],
                             mode="bilinear")
        x = x.clone()
        x[blur] = soft
    gain = 1 + 0.08 * (2 * torch.rand(b, 3, 1, 1, generator=g) - 1)
    return (x * gain).clamp(-1, 1)


def train_dino(cfg: MetricConfig, x: torch.Tensor, ids: list[Identity], log) -> ToyDino:
    mcfg = {MARKER: "dino", "width": cfg.width, "dim": cfg.dim, "image_size": IMAGE_SIZE}
    torch.manual_seed(cfg.seed)
    model = ToyDino(mcfg)
    labels = _labels(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps)
    g = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.steps):
        idx = torch.randint(len(x), (cfg.batch,), generator=g)
        z = F.normalize(model.image(augment(x[idx], g)), dim=-1) * 8  # cosine classifiers: the embedding's angle carries the parts
        loss = sum(F.cross_entropy(h(z), labels[k][idx]) for k, h in model.heads.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == cfg.steps - 1:
            log(f"dino step {step}/{cfg.steps} loss {loss.item():.3f}")
    return model.eval()


def train_clip(cfg: MetricConfig, x: torch.Tensor, caps: list[str], log) -> ToyClip:
    mcfg = {MARKER: "clip", "width": cfg.width, "dim": cfg.dim, "image_size": IMAGE_SIZE, "vocab": list(VOCAB)}
    torch.manual_seed(cfg.seed + 1)
    model = ToyClip(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    for step in range(cfg.steps):
        idx = torch.randint(len(x), (cfg.batch,), generator=g).tolist()
        texts = [caps[i] for i in idx]
        zi = F.normalize(model.image(augment(x[idx], g)), dim=-1)
        zt = F.normalize(model.text(texts), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * zi @ zt.T
        # identical captions in a batch are all positives (partial captions repeat often)
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == cfg.steps - 1:
            log(f"clip step {step}/{cfg.steps} loss {loss.item():.3f}")
    return model.eval()


# ------------------------------------------------------------------------------------------- reports
def _held_out_set(n_per: int, seed: int) -> tuple[list[Image.Image], list[int], list]:
    ims, who, scenes = [], [], []
    for s, ident in enumerate(HELD_OUT):
        for k in range(n_per):
            scene = random_scene(_rng("metric-eval", seed, s, k))
            ims.append(render_toy(ident, scene))
            who.append(s)
            scenes.append(scene)
    return ims, who, scenes


def retrieval_accuracy(dino: ToyDino, n_per: int = 10, seed: int = 0, neighbours: int = 0) -> float:
    """Top-1 leave-one-out retrieval: does a held-out toy's nearest image show the same toy? The gallery holds
    n_per images of every held-out identity plus, per held-out identity, n_per images of each of `neighbours`
    pretraining identities that differ from it in one part only (hard distractors)."""
    ims, who, _ = _held_out_set(n_per, seed)
    rng = _rng("retrieval", seed)
    for s, ident in enumerate(HELD_OUT):
        for j in range(neighbours):
            other = _perturb(ident, rng)
            for k in range(n_per):
                ims.append(render_toy(other, random_scene(_rng("metric-eval-nb", seed, s, j, k))))
                who.append(-1 - (s * neighbours + j))  # distractor classes are never queried, only found
    z = dino.embed(ims)
    sim = z @ z.T
    sim.fill_diagonal_(-2)
    nn_idx = sim.argmax(1).tolist()
    queries = [i for i, w in enumerate(who) if w >= 0]
    return float(np.mean([who[nn_idx[i]] == who[i] for i in queries]))


def _perturb(ident: Identity, rng: np.random.Generator) -> Identity:
    while True:
        f = list(FIELDS)[int(rng.integers(len(FIELDS)))]
        vals = FIELDS[f]
        d = Identity(**{**asdict(ident), f: vals[int(rng.integers(len(vals)))]})
        if d != ident and d.acc_color != d.color:
            return d


def caption_accuracy(clip: ToyClip, n_per: int = 10, ways: int = 10, seed: int = 0) -> dict[str, float]:
    """Held-out identities: pick the true caption among `ways` (the others change one part), and the
    background among all 6 ('a toy on a X background')."""
    ims, who, scenes = _held_out_set(n_per, seed)
    zi = clip.images(ims)
    hits, bg_hits = [], []
    bgs = list(BACKGROUNDS)
    zb = clip.texts([f"a toy on a {b} background" for b in bgs])
    for k, (s, scene) in enumerate(zip(who, scenes)):
        rng = _rng("captions", seed, k)
        ident = HELD_OUT[s]
        cands = [caption(ident, scene)]
        while len(cands) < ways:
            c = caption(_perturb(ident, rng), scene)
            if c not in cands:
                cands.append(c)
        zt = clip.texts(cands)
        hits.append(int((zt @ zi[k]).argmax()) == 0)
        bg_hits.append(bgs[int((zb @ zi[k]).argmax())] == scene.background)
    return {f"caption_{ways}way": float(np.mean(hits)), "background_6way": float(np.mean(bg_hits))}


def train_metric_models(cfg: MetricConfig, out: str | Path) -> dict:
    out = Path(out)
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t0:6.1f}s] {m}", flush=True)  # noqa: E731
    x, ids, caps = _dataset(cfg)
    log(f"{len(x)} training images rendered")
    dino = train_dino(cfg, x, ids, log)
    clip = train_clip(cfg, x, caps, log)
    report = {"config": asdict(cfg), "dino_heldout_retrieval_top1": retrieval_accuracy(dino),
              "dino_heldout_retrieval_top1_with_5_one_part_neighbours": retrieval_accuracy(dino, neighbours=5),
              **{f"clip_heldout_{k}": v for k, v in caption_accuracy(clip).items()},
              "seconds": time.perf_counter() - t0}
    _save(dino, dino.cfg, out / "dino")
    _save(clip, clip.cfg, out / "clip")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log(json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train the toy identity encoder (DINO role) and text-image scorer (CLIP role).")
    p.add_argument("--out", required=True)
    for f in MetricConfig.__dataclass_fields__.values():
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    train_metric_models(MetricConfig(**args), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Pretrain the toy FLUX pipeline from scratch on CPU (design section 8), deterministically from a seed.

    python -m blockskip_ray.toy.pretrain --out DIR        (the shipped model: the defaults; see docs/fidelity.md)

1. VAE (AutoencoderKL, factor 4, 4 latent channels) on 32-px domain images; then shift/scale factors set
   from the latent statistics.
2. A fixed dataset of pretraining images (held-out identities never appear), encoded ONCE: 32-px latents and
   one random crop per image resized to 16 px (the low resolution block-skip trains at), and the text
   embeddings of every distinct caption (the text encoders are frozen).
3. The FluxTransformer2DModel with the rectified-flow loss of the project's trainer (x_t = (1-s) x0 + s n,
   target n - x0, s uniform), 10% of captions replaced by "" so true CFG (true_cfg_scale) works, EMA weights.
4. Decoder-only VAE fine-tuning (encoder frozen, so the latents above are unchanged): sharper decodes.
5. `FluxPipeline.save_pretrained(out)` with the EMA transformer, plus pretrain.json (config, losses, timing)
   and blockskip_toy.json (how the model is sampled: 32 px, 20 steps, 16 text tokens).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..method.features import pack
from .domain import SIZE, _rng, pretraining_sample

LOW = SIZE // 2  # the block-skip low resolution (the paper: 512 -> 256)
from .model import TEXT_TOKENS, build_pipeline, build_transformer, build_vae, encode_text

PREVIEW_PROMPTS = [
    "a red round toy with blue ears on a gray background",
    "a striped yellow square toy with green hat on a pink background",
    "a dotted blue triangle toy with white horn on a black background",
    "a purple oval toy with yellow ears on a cyan checkered background",
    "a striped white square toy with purple horn on a brown background",
    "a green round toy with red hat on an orange background".replace("an orange", "a orange"),
    "a toy on a pink background",
    "a sks toy on a cyan background",
]


@dataclass
class PretrainConfig:
    seed: int = 0
    threads: int = 1  # more threads spin-wait on a shared, oversubscribed CPU (measured: 4x the CPU per step)
    vae_steps: int = 500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    decoder_steps: int = 0  # stage 4 (off for the shipped model): decoder-only fine-tuning, encoder frozen so every latent is unchanged
    images: int = 8000
    steps: int = 2000
    batch: int = 16
    lr: float = 5e-4
    warmup: int = 100
    lowres_every: int = 3  # every k-th step trains on the low-resolution (16 px) crops
    cfg_drop: float = 0.1
    ema: float = 0.998
    sample_every: int = 400
    sample_steps: int = 20
    transformer: dict = field(default_factory=dict)  # overrides of model.TRANSFORMER (tests use a tiny one)


def _log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def _random_crop(im: Image.Image, rng: np.random.Generator, out: int, min_side: int, multiple: int = 8) -> Image.Image:
    side = int(rng.integers(min_side // multiple, im.width // multiple + 1)) * multiple
    x, y = int(rng.integers(im.width - side + 1)), int(rng.integers(im.height - side + 1))
    im = im.crop((x, y, x + side, y + side))
    return im if side == out else im.resize((out, out), Image.Resampling.BICUBIC, reducing_gap=None)


def train_vae(cfg: PretrainConfig, t0: float):
    vae = build_vae(cfg.seed + 3)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.vae_steps):
        crops = [pretraining_sample(cfg.seed + 1000, step * cfg.vae_batch + k)[0] for k in range(cfg.vae_batch)]
        x = _to_tensor(crops)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = 0.5 * (post.mean.pow(2) + post.var - 1 - post.logvar).mean()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            _log(f"vae step {step}/{cfg.vae_steps} loss {loss.item():.4f} kl {kl.item():.3f}", t0)
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # latent statistics -> shift/scale, as FLUX's VAE config carries them
        x = _to_tensor([pretraining_sample(cfg.seed + 2000, k)[0] for k in range(256)])
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z[:8]).sample
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    return vae, _grid(torch.cat([x[:8], rec]).clamp(-1, 1), 8)


def finetune_decoder(vae, cfg: PretrainConfig, t0: float):
    """Sharpen the decoder with the encoder frozen: the latents the transformer was trained on stay the same,
    so this stage can run after (or beside) transformer training."""
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    opt = torch.optim.Adam(vae.decoder.parameters(), lr=cfg.vae_lr / 2)
    for step in range(cfg.decoder_steps):
        crops = [pretraining_sample(cfg.seed + 3000, step * cfg.vae_batch + k)[0] for k in range(cfg.vae_batch)]
        x = _to_tensor(crops)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg.decoder_steps - 1:
            _log(f"decoder step {step}/{cfg.decoder_steps} loss {loss.item():.4f}", t0)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = _to_tensor([pretraining_sample(cfg.seed + 2000, k)[0] for k in range(8)])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    return _grid(torch.cat([x, rec]).clamp(-1, 1), 8)


def _grid(x: torch.Tensor, cols: int) -> Image.Image:
    arr = ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    h, w = arr.shape[1:3]
    g = Image.new("RGB", (w * cols, h * math.ceil(len(arr) / cols)))
    for k, a in enumerate(arr):
        g.paste(Image.fromarray(a), ((k % cols) * w, (k // cols) * h))
    return g


@torch.no_grad()
def build_dataset(pipe, cfg: PretrainConfig, t0: float) -> dict[str, torch.Tensor]:
    vae = pipe.vae
    sf, sh = vae.config.scaling_factor, vae.config.shift_factor
    hi, lo, cap_idx, captions = [], [], [], {}
    for start in range(0, cfg.images, 64):
        batch = [pretraining_sample(cfg.seed, i) for i in range(start, min(cfg.images, start + 64))]
        ims = [b[0] for b in batch]
        crops = [_random_crop(im, _rng("lowres", cfg.seed, start + k), LOW, LOW) for k, im in enumerate(ims)]
        hi.append((vae.encode(_to_tensor(ims)).latent_dist.mean - sh) * sf)
        lo.append((vae.encode(_to_tensor(crops)).latent_dist.mean - sh) * sf)
        for _, c, _ in batch:
            cap_idx.append(captions.setdefault(c, len(captions)))
        if start % 4096 == 0:
            _log(f"dataset {start}/{cfg.images} images encoded, {len(captions)} distinct captions", t0)
    texts = list(captions) + [""]  # the last one: the empty caption (CFG dropout)
    pe, pooled = [], []
    for s in range(0, len(texts), 256):
        a, b = encode_text(pipe, texts[s:s + 256])
        pe.append(a)
        pooled.append(b)
    _log(f"dataset ready: {cfg.images} images, {len(texts)} captions embedded", t0)
    return {"hi": torch.cat(hi), "lo": torch.cat(lo), "cap": torch.tensor(cap_idx), "pe": torch.cat(pe),
            "pooled": torch.cat(pooled)}


def _ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def flow_loss(transformer, x0: torch.Tensor, pe: torch.Tensor, pooled: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The project trainer's objective (method/trainer.py): || v(x_t, s) - (noise - x0) ||^2, s ~ U(0, 1)."""
    b, _, h, w = x0.shape
    sigma = torch.rand(b, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(b, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    pred = transformer(hidden_states=pack(xt), encoder_hidden_states=pe, pooled_projections=pooled, timestep=sigma,
                       img_ids=_ids(h // 2, w // 2), txt_ids=torch.zeros(pe.shape[1], 3), return_dict=False)[0]
    return F.mse_loss(pred, pack(noise - x0))


def preview(pipe, out: Path, steps: int, seed: int = 0, cfg_scale: float = 3.0, rows: int = 1) -> Path:
    """A grid of PREVIEW_PROMPTS (columns: prompts; rows: `rows` seeds) with the stock pipeline and true CFG."""
    ims = []
    for s in range(rows):
        g = torch.Generator().manual_seed(seed + s)
        ims += pipe(PREVIEW_PROMPTS, negative_prompt=[""] * len(PREVIEW_PROMPTS), true_cfg_scale=cfg_scale, height=SIZE,
                    width=SIZE, num_inference_steps=steps, generator=g, max_sequence_length=TEXT_TOKENS).images
    grid = Image.new("RGB", (SIZE * len(PREVIEW_PROMPTS), rows * SIZE))
    for k, im in enumerate(ims):
        grid.paste(im, ((k % len(PREVIEW_PROMPTS)) * SIZE, (k // len(PREVIEW_PROMPTS)) * SIZE))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.resize((grid.width * 4, grid.height * 4), Image.Resampling.NEAREST).save(out)
    return out


def pretrain(cfg: PretrainConfig, out: str | Path) -> dict:
    out = Path(out)
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    vae, recon = train_vae(cfg, t0)
    (out / "progress").mkdir(parents=True, exist_ok=True)
    recon.save(out / "progress" / "vae_reconstructions.png")  # top: inputs, bottom: reconstructions
    t_vae = time.perf_counter() - t0
    transformer = build_transformer(cfg.seed + 4, **cfg.transformer)
    pipe = build_pipeline(vae, transformer)
    pipe.set_progress_bar_config(disable=True)
    data = build_dataset(pipe, cfg, t0)
    t_data = time.perf_counter() - t0 - t_vae
    ema = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, cfg.steps))))))
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    empty = len(data["pe"]) - 1
    losses, t_train = [], time.perf_counter()
    for step in range(cfg.steps):
        transformer.train()
        lowres = cfg.lowres_every and step % cfg.lowres_every == cfg.lowres_every - 1
        idx = torch.randint(len(data["cap"]), (cfg.batch,), generator=gen)
        cap = data["cap"][idx].clone()
        cap[torch.rand(cfg.batch, generator=gen) < cfg.cfg_drop] = empty
        x0 = (data["lo"] if lowres else data["hi"])[idx]
        loss = flow_loss(transformer, x0, data["pe"][cap], data["pooled"][cap], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        with torch.no_grad():
            d = min(cfg.ema, (1 + step) / (10 + step))
            for k, v in transformer.state_dict().items():
                ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
        if step % 50 == 0 or step == cfg.steps - 1:
            rate = (step + 1) / (time.perf_counter() - t_train)
            _log(f"step {step}/{cfg.steps} loss {np.mean(losses[-50:]):.4f} lr {sched.get_last_lr()[0]:.2e} "
                 f"{rate:.2f} steps/s", t0)
        if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
            _with_weights(transformer, ema, lambda: preview(pipe, out / "progress" / f"step_{step + 1:05d}.png",
                                                            cfg.sample_steps))
            _log(f"preview written: {out / 'progress' / f'step_{step + 1:05d}.png'}", t0)
    transformer.load_state_dict(ema)
    transformer.eval()
    if cfg.decoder_steps:
        finetune_decoder(vae, cfg, t0).save(out / "progress" / "vae_reconstructions_final.png")
    pipe.save_pretrained(out, safe_serialization=True)
    t_total = time.perf_counter() - t0
    report = {"config": asdict(cfg), "seconds": {"vae": t_vae, "dataset": t_data, "total": t_total},
              "loss_every_50": [float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)],
              "torch": torch.__version__}
    (out / "pretrain.json").write_text(json.dumps(report, indent=1))
    write_generation_defaults(out)
    if cfg.sample_every:
        preview(pipe, out / "progress" / "final.png", cfg.sample_steps, rows=2)
    _log(f"saved {out} ({t_total / 60:.1f} min)", t0)
    return report


def write_generation_defaults(out: Path) -> None:
    """blockskip_toy.json: how this model is sampled (probe/generate.generation_defaults reads it)."""
    (Path(out) / "blockskip_toy.json").write_text(json.dumps(
        {"resolution": SIZE, "low_resolution": LOW, "sample_steps": 20, "text_tokens": TEXT_TOKENS}, indent=1))


def _with_weights(model, weights: dict, fn):
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    model.eval()
    try:
        return fn()
    finally:
        model.load_state_dict(saved)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Pretrain the toy FLUX pipeline from scratch (deterministic).")
    p.add_argument("--out", required=True, help="output diffusers directory")
    p.add_argument("--vae-only", action="store_true", help="run only the VAE stages (1 and 5) and save the VAE to OUT")
    for f in PretrainConfig.__dataclass_fields__.values():
        if f.name != "transformer":
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = vars(p.parse_args(argv))
    out, vae_only = args.pop("out"), args.pop("vae_only")
    cfg = PretrainConfig(**args)
    if vae_only:
        torch.set_num_threads(cfg.threads)
        t0 = time.perf_counter()
        vae, recon = train_vae(cfg, t0)
        Path(out).mkdir(parents=True, exist_ok=True)
        recon.save(Path(out) / "vae_reconstructions.png")
        if cfg.decoder_steps:
            finetune_decoder(vae, cfg, t0).save(Path(out) / "vae_reconstructions_final.png")
        vae.save_pretrained(out, safe_serialization=True)
        return 0
    pretrain(cfg, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

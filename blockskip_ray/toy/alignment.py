"""Measured prompt following of the toy model: do generated images show what their prompts name?

For n random identities (pretraining ones, or held-out combinations the model never saw as a whole) in random
scenes, the full caption is rendered with the stock FluxPipeline; the identity encoder's part classifiers
(toy/metric_models.ToyDino heads, trained on rendered images) read shape, colour, pattern, accessory and
accessory colour back from the generated image, and the text-image scorer picks the background among all six.
Reported: per-part accuracy against the prompt (chance = 1 / number of values), also for the rendered
ground-truth images (the classifiers' own ceiling) and for images generated from the empty prompt
(what the model draws when told nothing).

    python -m blockskip_ray.toy.alignment [--model toy:flux] [--n 48] [--grid docs/img/toy_samples.png]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .domain import BACKGROUNDS, HELD_OUT, PRETRAIN_IDENTITIES, SIZE, _rng, caption, random_scene, render_toy
from .metric_models import FIELDS, ToyClip, ToyDino, load_toy_metric, to_tensor


def _cases(n: int, held_out: bool, seed: int):
    rng = _rng("alignment", seed, held_out)
    pool = HELD_OUT if held_out else PRETRAIN_IDENTITIES
    return [(pool[int(rng.integers(len(pool)))], random_scene(rng)) for _ in range(n)]


@torch.no_grad()
def read_parts(dino: ToyDino, clip: ToyClip, images: list[Image.Image]) -> list[dict]:
    x = to_tensor(images, dino.cfg["image_size"])
    z = torch.nn.functional.normalize(dino.image(x), dim=-1) * 8
    parts = {k: h(z).argmax(-1).tolist() for k, h in dino.heads.items()}
    bgs = list(BACKGROUNDS)
    zb = clip.texts([f"a toy on a {b} background" for b in bgs])
    bg = (clip.images(images) @ zb.T).argmax(-1).tolist()
    return [{**{k: FIELDS[k][parts[k][i]] for k in FIELDS}, "background": bgs[bg[i]]} for i in range(len(images))]


def _accuracy(read: list[dict], cases) -> dict[str, float]:
    out = {}
    for k in list(FIELDS) + ["background"]:
        truth = [getattr(sc, k) if k == "background" else getattr(ident, k) for ident, sc in cases]
        out[k] = float(np.mean([r[k] == t for r, t in zip(read, truth)]))
    return out


def generate(pipe, prompts: list[str], seed: int, steps: int = 20, cfg: float = 3.0, batch: int = 16) -> list[Image.Image]:
    from ..models.loading import generation_kwargs

    ims = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        chunk = prompts[i:i + batch]
        ims += pipe(chunk, negative_prompt=[""] * len(chunk), true_cfg_scale=cfg, num_inference_steps=steps,
                    height=SIZE, width=SIZE, generator=g, **generation_kwargs(pipe)).images
    return ims


def alignment_report(pipe, dino: ToyDino, clip: ToyClip, n: int = 48, seed: int = 0, cfg: float = 3.0) -> dict:
    report = {"n": n, "cfg": cfg, "chance": {k: 1 / len(v) for k, v in FIELDS.items()} | {"background": 1 / len(BACKGROUNDS)}}
    for name, held in (("pretraining_identities", False), ("held_out_combinations", True)):
        cases = _cases(n, held, seed)
        prompts = [caption(i, s) for i, s in cases]
        gen = generate(pipe, prompts, seed, cfg=cfg)
        report[name] = {"generated": _accuracy(read_parts(dino, clip, gen), cases),
                        "rendered_ceiling": _accuracy(read_parts(dino, clip, [render_toy(i, s) for i, s in cases]), cases)}
        report.setdefault("_images", {})[name] = (prompts, gen)
    empty = generate(pipe, [""] * n, seed + 7, cfg=1.0)
    report["empty_prompt"] = _accuracy(read_parts(dino, clip, empty), _cases(n, False, seed))
    return report


def sample_grid(prompts: list[str], images: list[Image.Image], cols: int = 4, scale: int = 4) -> Image.Image:
    """Each sample (scaled up, nearest) with its prompt written under it."""
    font = ImageFont.load_default()
    cell_w, cell_h = SIZE * scale + 130, SIZE * scale + 44
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    d = ImageDraw.Draw(grid)
    for k, (p, im) in enumerate(zip(prompts, images)):
        x, y = (k % cols) * cell_w, (k // cols) * cell_h
        grid.paste(im.resize((SIZE * scale, SIZE * scale), Image.Resampling.NEAREST), (x + 65, y + 2))
        words, lines, line = p.split(), [], ""
        for w in words:  # wrap the prompt under the image
            if len(line) + len(w) > 38:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        for j, text in enumerate(lines[:3]):
            d.text((x + 4, y + SIZE * scale + 4 + 12 * j), text, fill="black", font=font)
    return grid


def main(argv: list[str] | None = None) -> int:
    from ..models.loading import load_pipeline
    from . import resolve_model_arg

    p = argparse.ArgumentParser(description="Measure how well the toy model follows its prompts.")
    p.add_argument("--model", default="toy:flux")
    p.add_argument("--dino", default="toy:dino")
    p.add_argument("--clip", default="toy:clip")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--grid", default=None, help="also save a prompt/sample grid PNG (16 held-out-combination samples)")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_pipeline(resolve_model_arg(args.model))
    dino, clip = load_toy_metric(resolve_model_arg(args.dino)), load_toy_metric(resolve_model_arg(args.clip))
    report = alignment_report(pipe, dino, clip, args.n, args.seed, args.cfg)
    images = report.pop("_images")
    if args.grid:
        prompts, ims = images["pretraining_identities"]
        hp, hi = images["held_out_combinations"]
        sample_grid(prompts[:8] + hp[:8], ims[:8] + hi[:8]).save(args.grid)
    text = json.dumps(report, indent=1)
    if args.json:
        open(args.json, "w").write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`blockskip eval`: DINO / CLIP-I / CLIP-T of one adapter (paper protocol), written as a Parquet table."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="score an adapter: DINO, CLIP-I, CLIP-T against the subject's reference images",
        description="Generates --images-per-prompt images per prompt with the stock pipeline and the adapter, then "
                    "computes DINO and CLIP-I (mean cosine over all generated x reference image pairs) and CLIP-T "
                    "(cosine of each image with its prompt). Writes one row per generated image to --out (Parquet) "
                    "and prints the means.")
    p.add_argument("--model", required=True, help="local diffusers FLUX/SANA directory")
    p.add_argument("--adapter", default=None, help="adapter directory (OUT/adapter of `blockskip train`); omit to score the base model")
    p.add_argument("--images", required=True, help="directory of the subject's reference images")
    p.add_argument("--prompts", nargs="+", required=True, help="evaluation prompts")
    p.add_argument("--dino", required=True, help="DINOv2 model: a saved transformers directory or a store URI")
    p.add_argument("--clip", required=True, help="CLIP model (with tokenizer and image processor): directory or store URI")
    p.add_argument("--out", required=True, help="output table (.parquet)")
    p.add_argument("--subject-id", default="subject", help="subject id written into the table")
    p.add_argument("--images-per-prompt", type=int, default=4, help="generated images per prompt (paper: 4)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 4 for tiny models, 28 otherwise)")
    p.add_argument("--resolution", type=int, default=None, help="generation size (default: 64 tiny, 512 otherwise)")
    p.add_argument("--seed", type=int, default=0, help="first seed; image j of every prompt uses seed + j")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--save-images", default=None, metavar="DIR", help="also save the generated images here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..probe.evaluate import EvalSpec, evaluate
    from ..store import validate_id

    out = Path(args.out)
    if out.suffix != ".parquet":
        raise ValueError(f"--out must be a .parquet file, got {out}")
    spec = EvalSpec(model=args.model, images=args.images, prompts=args.prompts, dino=args.dino, clip=args.clip,
                    adapter=args.adapter, subject_id=validate_id(args.subject_id), images_per_prompt=args.images_per_prompt,
                    steps=args.steps, resolution=args.resolution, seed=args.seed, device=args.device,
                    save_images=args.save_images)
    scores, rows = evaluate(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)
    width = max(len(r["prompt"]) for r in rows)
    print(f"{'prompt':<{width}}  {'DINO':>7} {'CLIP-I':>7} {'CLIP-T':>7}")
    for p in args.prompts:
        sel = [r for r in rows if r["prompt"] == p]
        m = {k: sum(r[k] for r in sel) / len(sel) for k in ("dino", "clip_i", "clip_t")}
        print(f"{p:<{width}}  {m['dino']:7.4f} {m['clip_i']:7.4f} {m['clip_t']:7.4f}")
    print(f"{'mean (' + str(len(rows)) + ' images)':<{width}}  {scores.dino:7.4f} {scores.clip_i:7.4f} {scores.clip_t:7.4f}")
    print(f"table: {out}")
    return 0

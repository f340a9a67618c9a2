"""`blockskip init-model`: write a complete tiny diffusers pipeline, built locally (the embedded default model)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "init-model", help="write a tiny random FLUX or SANA pipeline (no downloads)",
        description="Write a complete diffusers pipeline (tiny random transformer, VAE, text encoders, tokenizers built "
                    "locally) to OUT. FluxPipeline.from_pretrained(OUT) / SanaPipeline.from_pretrained(OUT) loads it.",
    )
    p.add_argument("--family", choices=["flux", "sana"], required=True, help="architecture of the pipeline to build")
    p.add_argument("--size", choices=["tiny"], default="tiny", help="only 'tiny' can be built without weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("out", type=Path, help="output directory (must not exist or be empty)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models.tiny import init_model

    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"{args.out} exists and is not empty")
    out = init_model(args.family, args.out, args.size, args.seed)
    print(f"wrote tiny {args.family} pipeline to {out}")
    return 0

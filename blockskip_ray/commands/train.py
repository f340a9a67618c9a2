"""`blockskip train`: personalize one subject on one device."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..method.modes import MODES

# = method.lora.TARGET_CHOICES, spelled out so `--help` does not import torch/peft (a test keeps them equal)
TARGET_CHOICES = ("attn", "attn+ff")


def parse_skip(text: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--skip takes N,M (two integers), got {text!r}") from None
    return n, m


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train one subject's block-skipped LoRA on one device",
        description="Personalize one subject: plan -> precompute the skipped blocks' features with the frozen model -> "
                    "train LoRA on the kept blocks only -> OUT/adapter (diffusers LoRA format), OUT/metrics.json, "
                    "OUT/samples/. Modes: blockskip (the method), lora (all blocks, fixed resolution), naive-skip "
                    "(skip without features), resize (skip with features, no dynamic crop).",
    )
    p.add_argument("--model", required=True, help="local diffusers directory (FLUX or SANA), e.g. from init-model")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="directory with the subject's 4-6 reference images")
    src.add_argument("--features", metavar="URI",
                     help="store (local dir or s3://) holding --subject-id's precomputed features from `blockskip "
                          "precompute`: read them (with prefetch) instead of computing them; the flags that decide "
                          "the features (--steps, --resolution, --s-max, --seed, --text-tokens, --prompt, skip) must "
                          "match the precompute run")
    p.add_argument("--prompt", required=True, help='instance prompt, e.g. "a photo of sks toy"')
    p.add_argument("--out", required=True, type=Path,
                   help="output directory: adapter/, metrics.json, samples/, logs/ (TensorBoard), loss_curve.png")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--skip-ratio", type=float,
                   help="fraction of blocks to skip; split from the selection table (--store) or the default rule "
                        "(default 0.3 unless --skip)")
    g.add_argument("--skip", type=parse_skip, metavar="N,M", help="explicit skip plan: skip the first N and the last M blocks")
    p.add_argument("--mode", choices=sorted(MODES), default="blockskip",
                   help="blockskip (the method), lora (all blocks), naive-skip, resize")
    p.add_argument("--steps", type=int, default=500, help="training steps (one crop per step)")
    p.add_argument("--resolution", type=int, default=256, help="s_min: training resolution (multiple of 16 for FLUX)")
    p.add_argument("--s-max", type=int, default=None, help="largest crop side (default: each image's shorter side, capped at 1024)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=None,
                   help="LoRA alpha; the update is scaled by alpha/rank (default: alpha = rank, scale 1)")
    p.add_argument("--lora-targets", choices=TARGET_CHOICES, default="attn",
                   help="attn: the attention projections; attn+ff: also the feed-forward layers, as diffusers' "
                        "DreamBooth FLUX LoRA script")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of the plan (crops, timesteps, noise) and the LoRA init")
    p.add_argument("--subject-id", default="subject", help="the subject's id (its key in a store for --features)")
    p.add_argument("--text-tokens", type=int, default=512, help="max text tokens (T5 for FLUX, Gemma for SANA)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each kept block's activations in backward (less memory, ~30%% slower)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="save LoRA+optimizer+RNG every K steps in OUT/checkpoints (resumable; 0: never)")
    p.add_argument("--samples", type=int, default=2, help="sample images to generate after training")
    p.add_argument("--sample-steps", type=int, default=20, help="denoising steps per sample image")
    p.add_argument("--store", default=None, help="store URI whose selection table (models/*/selection.json) sets the split for --skip-ratio")
    p.add_argument("--device", default="auto", help="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..method.personalize import TrainSpec, num_blocks, personalize, resolve_skip
    from ..method.trainer import OptimConfig

    spec = TrainSpec(
        model=args.model, images=args.images or "", prompt=args.prompt, out=str(args.out), subject_id=args.subject_id,
        skip=args.skip, skip_ratio=args.skip_ratio, mode=args.mode, steps=args.steps, resolution=args.resolution,
        s_max=args.s_max, seed=args.seed, max_text_tokens=args.text_tokens, checkpoint_every=args.checkpoint_every,
        num_samples=args.samples, sample_steps=args.sample_steps, device=args.device,
        optim=OptimConfig(rank=args.rank, alpha=args.alpha, targets=args.lora_targets, lr=args.lr, gradient_checkpointing=args.gradient_checkpointing),
    )
    lookup = _selection_lookup(args.store, args.model) if args.store else None
    features = None
    if args.features:
        from ..store import Store
        features = Store.open(args.features)
        if spec.skip_ratio is not None:  # pin the split so it is checked against the stored one
            spec = replace(spec, skip=resolve_skip(spec, num_blocks(spec.model), lookup), skip_ratio=None)
    m = personalize(spec, lookup=lookup, features=features)
    print(json.dumps({k: v for k, v in m.items() if k != "loss"} | {"loss_first": m["loss"][0], "loss_last": m["loss"][-1]}, indent=1))
    print(f"adapter: {Path(args.out) / 'adapter'}")
    return 0


def _selection_lookup(store_uri: str, model: str):
    try:
        from ..probe.selection import lookup_for
        from ..store import Store
    except ImportError as e:  # pragma: no cover - until the selection table lands
        raise ValueError(f"--store needs the selection table support ({e})") from None
    return lookup_for(Store.open(store_uri), model)

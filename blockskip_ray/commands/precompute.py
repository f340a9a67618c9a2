"""`blockskip precompute`: fill the feature store for a catalog of subjects with a Ray Data pipeline."""
from __future__ import annotations

from .train import parse_skip

import argparse
import json
import sys


_skip = parse_skip  # one --skip parser for every command


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "precompute", help="precompute the frozen model's features of a catalog into the store (Ray Data)",
        description="For every subject of the catalog: build its plan, compute the leading state / trailing delta / "
                    "target of every step on a pool of Ray actors (the frozen model loaded once per actor), and "
                    "write them as shards to STORE/subjects/{id}/features/ (committed last). Subjects already "
                    "committed for the same configuration are skipped; a crashed run is resumed by rerunning.")
    p.add_argument("--model", required=True, help="diffusers directory (e.g. from `blockskip init-model`)")
    p.add_argument("--store", required=True, help="local path or s3://bucket/prefix")
    p.add_argument("--catalog", required=True, help="JSONL or Parquet: id, images, prompt, class[, eval_prompts]")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--skip", type=_skip, help="skip the first N and last M blocks: N,M")
    g.add_argument("--skip-ratio", type=float, help="fraction of blocks to skip (default 0.3)")
    p.add_argument("--mode", default="blockskip", help="blockskip | resize | naive-skip | lora (default blockskip)")
    p.add_argument("--steps", type=int, default=500, help="training steps to precompute (default 500)")
    p.add_argument("--resolution", type=int, default=256, help="s_min: crops are resized to this (default 256)")
    p.add_argument("--s-max", type=int, default=None, help="largest crop side (default: image's shorter side)")
    p.add_argument("--seed", type=int, default=0, help="plan seed (crops, timesteps, noise); must match training's --seed")
    p.add_argument("--max-text-tokens", type=int, default=512, help="max text tokens (T5 for FLUX, Gemma for SANA)")
    p.add_argument("--guidance", type=float, default=3.5, help="FLUX guidance value fed to the embedder")
    p.add_argument("--feature-dtype", choices=["bf16", "fp32", "fp8_e4m3"], default="bf16",
                   help="how features are stored (default bf16; fp8_e4m3 uses per-token scales)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (0: CPU actors)")
    p.add_argument("--concurrency", type=int, default=1, help="number of feature actors (default 1)")
    p.add_argument("--batch-size", type=int, default=4, help="plan rows per actor call (default 4)")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute subjects whose committed features are for another configuration")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: the current one, or start one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..method.catalog import load_catalog
    from ..method.modes import check_skip, default_split, get_mode
    from ..method.personalize import num_blocks
    from ..models.loading import model_family
    from ..store import Store

    model_family(args.model)  # a clear error before Ray starts
    mode = get_mode(args.mode)
    n_blocks = num_blocks(args.model)
    if not mode.skips:
        if args.skip not in (None, (0, 0)) or args.skip_ratio:
            raise ValueError(f"--mode {args.mode} trains every block: --skip / --skip-ratio do not apply")
        skip = (0, 0)
    elif args.skip is not None:
        skip = check_skip(args.skip, n_blocks)
    else:
        # The selection table lookup belongs to the catalog job; here the documented default split.
        skip = check_skip(default_split(0.3 if args.skip_ratio is None else args.skip_ratio, n_blocks), n_blocks)
    if args.steps <= 0 or args.concurrency <= 0 or args.batch_size <= 0 or args.num_gpus < 0:
        raise ValueError("--steps, --concurrency and --batch-size must be positive, --num-gpus >= 0")
    subjects, errors = load_catalog(args.catalog)
    for row, sid, reason in errors:
        print(f"catalog row {row} ({sid or 'no id'}): {reason}", file=sys.stderr)
    if not subjects:
        raise ValueError(f"no valid subject in {args.catalog}")
    store = Store.open(args.store, endpoint_url=args.endpoint_url)

    from ..distributed.precompute import PrecomputeConfig, run_precompute
    from ..distributed.probes import ensure_ray

    cfg = PrecomputeConfig(model=args.model, skip=skip, mode=args.mode, steps=args.steps, resolution=args.resolution,
                           s_max=args.s_max, seed=args.seed, max_text_tokens=args.max_text_tokens,
                           guidance=args.guidance, feature_dtype=args.feature_dtype, num_gpus=args.num_gpus,
                           concurrency=args.concurrency, batch_size=args.batch_size, endpoint_url=args.endpoint_url)
    print(f"precompute: {len(subjects)} subject(s), skip n={skip[0]} m={skip[1]}, {args.steps} steps, "
          f"{args.feature_dtype} -> {store.uri}", file=sys.stderr)
    ensure_ray(log=lambda m: print(m, file=sys.stderr), address=args.address or "auto")
    results = run_precompute(store, subjects, cfg, overwrite=args.overwrite)
    for row, sid, reason in errors:
        results[sid or f"row-{row}"] = {"state": "failed", "error": f"catalog row {row}: {reason}"}
    print(json.dumps(results, indent=1))
    return 1 if any(r["state"] == "failed" for r in results.values()) else 0

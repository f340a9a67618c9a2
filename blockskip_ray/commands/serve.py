"""`blockskip serve`: one HTTP endpoint (Ray Serve + FastAPI) for every adapter in a store."""
from __future__ import annotations

import argparse
import os

from ..http_guard import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES
from ..serving import ServeLimits

_L = ServeLimits()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve every trained adapter from one HTTP endpoint (Ray Serve)",
        description="Start a Ray Serve application (a local Ray cluster when none runs): POST /v1/images "
                    "{adapter, prompt, seed?, steps?, guidance?, width?, height?} -> image/png, GET /v1/adapters, "
                    "GET /healthz, docs at /docs. The base pipeline is loaded once per replica; adapters are "
                    "loaded from the store on demand and kept in an LRU cache. Auth: set BLOCKSKIP_API_TOKEN "
                    "(preferred: keeps it out of the process list) or --token to require 'Authorization: Bearer "
                    "<token>' (not on /healthz, /docs). Stops cleanly on Ctrl-C or SIGTERM. See docs/serving.md.",
    )
    p.add_argument("--model", required=True, help="local diffusers directory (FLUX or SANA), e.g. from init-model, or "
                   "the s3:// URI of one published with `python -m blockskip_ray.models.fetch publish` (fetched "
                   "once per node into $BLOCKSKIP_MODEL_CACHE, verified)")
    p.add_argument("--store", required=True, help="store URI (local path or s3://bucket/prefix) holding subjects/{id}/adapter/")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; 0.0.0.0 to expose)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--cache-size", type=int, default=3, help="adapters kept loaded per replica (LRU)")
    p.add_argument("--max-ongoing", type=int, default=2, help="requests in flight per Generator replica")
    p.add_argument("--max-queued", type=int, default=16, help="requests waiting beyond that; more get 503")
    p.add_argument("--replicas", type=int, default=1, help="Generator replicas (each loads the base model)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs per replica (default: 1 if CUDA is visible, else 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA with bf16 when available, else CPU fp32), cpu, cuda")
    p.add_argument("--token", default=None, help="bearer token (default: $BLOCKSKIP_API_TOKEN)")
    p.add_argument("--max-steps", type=int, default=_L.max_steps)
    p.add_argument("--default-steps", type=int, default=_L.default_steps)
    p.add_argument("--min-side", type=int, default=_L.min_side)
    p.add_argument("--max-side", type=int, default=_L.max_side)
    p.add_argument("--default-side", type=int, default=_L.default_side)
    p.add_argument("--multiple", type=int, default=_L.multiple, help="width/height must be multiples of this (32 for SANA)")
    p.add_argument("--max-prompt-chars", type=int, default=_L.max_prompt_chars)
    p.add_argument("--max-step-pixels", type=int, default=_L.max_step_pixels,
                   help="compute budget of one request: steps x width x height (default admits 28 steps at 1024x1024)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies get 413 without being read")
    p.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                   help="seconds a client has to send its whole body (else 408)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..distributed.serve_run import run_server
    from ..models.fetch import check_model, is_store_uri

    check_model(args.model)  # a clear error now rather than a failed replica later
    num_gpus = args.num_gpus if args.num_gpus is not None else (1.0 if torch.cuda.is_available() and args.device != "cpu" else 0.0)
    app_args = {
        "model": args.model if is_store_uri(args.model) else os.path.abspath(args.model), "device": args.device, "token": args.token,
        # Replicas may run in another working directory: a local store path must be absolute.
        "store": args.store if "://" in args.store else os.path.abspath(args.store),
        "cache_size": args.cache_size, "num_replicas": args.replicas, "num_gpus": num_gpus,
        "max_ongoing": args.max_ongoing, "max_queued": args.max_queued, "max_steps": args.max_steps,
        "default_steps": args.default_steps, "min_side": args.min_side, "max_side": args.max_side,
        "default_side": args.default_side, "multiple": args.multiple, "max_prompt_chars": args.max_prompt_chars,
        "max_step_pixels": args.max_step_pixels, "max_body_bytes": args.max_body_bytes,
        "body_timeout_s": args.body_timeout,
    }
    return run_server(app_args, args.host, args.port)

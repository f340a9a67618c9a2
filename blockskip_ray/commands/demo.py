"""`blockskip demo`: the whole method on embedded defaults (tiny FLUX, a synthetic subject), on this machine."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="run everything on embedded defaults (tiny model, synthetic subject)",
        description="Build the tiny FLUX model, draw a synthetic subject, train it with block skipping, write the "
                    "adapter and sample images, and print a summary.",
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"))
    p.add_argument("--steps", type=int, default=40)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..method.images import make_synthetic_subject
    from ..method.personalize import TrainSpec, personalize
    from ..method.trainer import OptimConfig
    from ..models.tiny import init_model

    t0 = time.perf_counter()
    out = args.out
    model = out / "model"
    if not (model / "model_index.json").exists():
        init_model("flux", model)
    make_synthetic_subject(out / "subject", n=5, size=192)
    spec = TrainSpec(model=str(model), images=str(out / "subject"), prompt="a photo of sks toy", out=str(out / "run"),
                     subject_id="toy-1", skip_ratio=0.3, steps=args.steps, resolution=64, max_text_tokens=32,
                     num_samples=3, sample_steps=8, optim=OptimConfig(lr=1e-3, rank=8))
    m = personalize(spec)
    print("\n== demo summary ==")
    print(json.dumps({
        "model": str(model), "skip [n, m]": m["skip"], "num_blocks": m["num_blocks"],
        "skipped_param_fraction": round(m["skipped_param_fraction"], 3),
        "loss first -> last": [round(m["loss"][0], 4), round(m["loss"][-1], 4)],
        "steps_per_s": round(m["steps_per_s"], 2), "peak_memory_bytes": m["peak_memory_bytes"],
        "peak_memory_kind": m["peak_memory_kind"], "adapter": str(Path(spec.out) / "adapter"),
        "samples": m.get("samples", []), "wall_s": round(time.perf_counter() - t0, 1),
    }, indent=1))
    return 0

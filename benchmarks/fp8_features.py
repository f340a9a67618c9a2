"""Feature dtype study: reconstruction error of stored features (bf16, fp8_e4m3 vs fp32) and the training loss.

Computes one subject's features on the tiny FLUX model in fp32, stores them with each feature dtype, reads them
back, and (1) prints the relative RMS error per tensor, (2) trains the same spec from each stored set with the
same seed and prints the loss curves side by side.

    PYTHONPATH=. python benchmarks/fp8_features.py [--steps 20] [--resolution 64]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from blockskip_ray.method.images import make_synthetic_subject  # noqa: E402
from blockskip_ray.method.personalize import TrainSpec, precompute, prepare  # noqa: E402
from blockskip_ray.method.stored import make_meta, read_features, train_from_store, write_features  # noqa: E402
from blockskip_ray.models.tiny import init_model  # noqa: E402
from blockskip_ray.store import Store  # noqa: E402

DTYPES = ("fp32", "bf16", "fp8_e4m3")


def rel_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((a.float() - ref.float()).pow(2).mean() / ref.float().pow(2).mean().clamp_min(1e-30)).sqrt())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--skip", default="3,3")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fp8bench-"))
    model = init_model("flux", tmp / "flux-tiny")
    make_synthetic_subject(tmp / "imgs", n=4, size=128, seed=1)
    skip = tuple(int(v) for v in args.skip.split(","))
    spec = TrainSpec(model=str(model), images=str(tmp / "imgs"), prompt="a photo of sks toy", out=str(tmp / "out"),
                     subject_id="toy-1", skip=skip, steps=args.steps, resolution=args.resolution, s_max=128,
                     max_text_tokens=32, num_samples=0)
    family, images, plan, skip = prepare(spec, log=lambda _: None)
    text, feats = precompute(spec, images, plan, skip, torch.device("cpu"), progress=False)
    errs: dict[str, dict[str, list[float]]] = {}
    losses: dict[str, list[float]] = {}
    nbytes: dict[str, int] = {}
    for dt in DTYPES:
        store = Store.open(str(tmp / f"store-{dt}"))
        meta = make_meta(model=spec.model, family=family, skip=skip, mode=spec.mode, resolution=spec.resolution,
                         s_max=spec.s_max, steps=spec.steps, seed=spec.seed, max_text_tokens=spec.max_text_tokens,
                         guidance=spec.optim.guidance, prompt=spec.prompt, feature_dtype=dt, compute_dtype="fp32")
        write_features(store, "toy-1", text, feats, plan, meta)
        nbytes[dt] = sum(p.stat().st_size for p in (store.local_path / "subjects/toy-1/features").glob("shard-*"))
        _, _, it = read_features(store, "toy-1")
        for (_, ref), (_, got) in zip(feats, it):
            for k in ("h", "e", "delta", "target"):
                if k in ref:
                    errs.setdefault(k, {}).setdefault(dt, []).append(rel_rms(got[k], ref[k]))
        torch.manual_seed(0)
        _, m, _ = train_from_store(spec, store, "toy-1", torch.device("cpu"), log=lambda _: None)
        losses[dt] = m["loss"]
    print("command:", "PYTHONPATH=. python benchmarks/fp8_features.py " + " ".join(sys.argv[1:]))
    print(f"tiny FLUX, skip {skip}, {args.steps} steps, s_min {args.resolution}; relative RMS error vs fp32 "
          "(mean over steps)")
    print(f"{'tensor':8s} {'bf16':>10s} {'fp8_e4m3':>10s} {'fp8/bf16':>9s}")
    for k, by in errs.items():
        b, f = (sum(by[d]) / len(by[d]) for d in ("bf16", "fp8_e4m3"))
        print(f"{k:8s} {b:10.2e} {f:10.2e} {f / b:9.1f}")
    print(f"shard bytes per step: " + ", ".join(f"{d} {nbytes[d] / args.steps:.0f}" for d in DTYPES))
    print(f"{'step':>4s} {'fp32':>8s} {'bf16':>8s} {'fp8':>8s}")
    for i in range(args.steps):
        print(f"{i:4d} {losses['fp32'][i]:8.4f} {losses['bf16'][i]:8.4f} {losses['fp8_e4m3'][i]:8.4f}")
    for d in ("bf16", "fp8_e4m3"):
        diff = [abs(a - b) for a, b in zip(losses[d], losses["fp32"])]
        rel = [abs(a - b) / abs(b) for a, b in zip(losses[d], losses["fp32"])]
        print(f"{d}: max |loss - fp32 loss| {max(diff):.2e}, mean relative {sum(rel) / len(rel):.2e}, "
              f"mean loss {sum(losses[d]) / len(losses[d]):.4f} (fp32 {sum(losses['fp32']) / len(losses['fp32']):.4f})")


if __name__ == "__main__":
    main()

"""Precompute throughput (Ray Data actors), bytes per step, and store read throughput while training.

One run on the tiny FLUX model: precompute a small catalog with 1 and with 2 actors on a local Ray, then
read the features back (local directory and S3 on a local moto server) alone and inside training, next to
training on in-memory features.

    PYTHONPATH=. python benchmarks/precompute_throughput.py [--subjects 2] [--steps 12] [--resolution 64]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
    os.environ[k] = v  # a local moto server only: never the caller's real credentials
os.environ.pop("AWS_PROFILE", None)

from blockskip_ray.distributed.precompute import PrecomputeConfig, run_precompute  # noqa: E402
from blockskip_ray.method.catalog import load_catalog  # noqa: E402
from blockskip_ray.method.images import make_synthetic_subject  # noqa: E402
from blockskip_ray.method.personalize import TrainSpec, train  # noqa: E402
from blockskip_ray.method.stored import read_features, train_from_store  # noqa: E402
from blockskip_ray.models.tiny import init_model  # noqa: E402
from blockskip_ray.store import Store  # noqa: E402


def feature_bytes(store: Store, sid: str) -> int:
    return sum(len(store.read_bytes(k)) for k in store.list(f"subjects/{sid}/features") if "/shard-" in k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--feature-dtype", default="bf16")
    args = ap.parse_args()
    import boto3
    import ray
    from moto.server import ThreadedMotoServer

    tmp = Path(tempfile.mkdtemp(prefix="pcbench-"))
    model = init_model("flux", tmp / "flux-tiny")
    lines = []
    for i in range(args.subjects):
        make_synthetic_subject(tmp / f"s{i}", n=4, size=128, seed=i)
        lines.append(json.dumps({"id": f"toy-{i}", "images": str(tmp / f"s{i}"), "prompt": "a photo of sks toy"}))
    (tmp / "catalog.jsonl").write_text("\n".join(lines) + "\n")
    subjects, _ = load_catalog(tmp / "catalog.jsonl")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://%s:%d" % server.get_host_and_port()
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    total = args.subjects * args.steps
    for conc in (1, 2):
        cfg = PrecomputeConfig(model=str(model), skip=(3, 3), steps=args.steps, resolution=args.resolution,
                               s_max=128, max_text_tokens=32, feature_dtype=args.feature_dtype, concurrency=conc,
                               batch_size=2)
        store = Store.open(str(tmp / f"store-c{conc}"))
        t0 = time.perf_counter()
        run_precompute(store, subjects, cfg, log=lambda _: None)
        dt = time.perf_counter() - t0
        rows.append((f"precompute, {conc} actor(s)", f"{total / dt:.2f} steps/s total, "
                     f"{total / dt / conc:.2f} per actor ({dt:.1f} s incl. actor start)"))
    ray.shutdown()
    local = Store.open(str(tmp / "store-c1"))
    s3 = Store.open("s3://bench/p", endpoint_url=endpoint)
    s3.upload_dir(str(tmp / "store-c1" / "subjects"), "subjects")
    per_step = feature_bytes(local, "toy-0") / args.steps
    rows.append(("bytes per step", f"{per_step:.0f} B ({args.feature_dtype}, skip 3,3, s_min {args.resolution})"))
    spec = TrainSpec(model=str(model), images=str(tmp / "s0"), prompt="a photo of sks toy", out=str(tmp / "o"),
                     subject_id="toy-0", skip=(3, 3), steps=args.steps, resolution=args.resolution, s_max=128,
                     max_text_tokens=32, num_samples=0)
    text, _, it = read_features(local, "toy-0")
    feats = list(it)
    torch.manual_seed(0)
    _, m = train(spec, (3, 3), text, feats, torch.device("cpu"), log=lambda _: None)
    base = m["steps_per_s"]
    rows.append(("train, in-memory features", f"{base:.2f} steps/s"))
    for name, st in (("local", local), ("moto S3", s3)):
        t0 = time.perf_counter()
        _, _, it = read_features(st, "toy-0", prefetch=2)
        n = sum(1 for _ in it)
        dt = time.perf_counter() - t0
        rows.append((f"read only, {name}", f"{n / dt:.1f} steps/s, {n * per_step / dt / 2**20:.2f} MiB/s"))
        torch.manual_seed(0)
        _, m, _ = train_from_store(spec, st, "toy-0", torch.device("cpu"), log=lambda _: None)
        rows.append((f"train from {name} store", f"{m['steps_per_s']:.2f} steps/s "
                     f"({m['steps_per_s'] / base:.2f}x in-memory)"))
    server.stop()
    print("command:", "PYTHONPATH=. python benchmarks/precompute_throughput.py " + " ".join(sys.argv[1:]))
    print(f"tiny FLUX, {args.subjects} subjects x {args.steps} steps, CPU")
    w = max(len(r[0]) for r in rows)
    for a, b in rows:
        print(f"{a:{w}s}  {b}")


if __name__ == "__main__":
    main()

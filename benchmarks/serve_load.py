"""Load test of the image service on loopback: latency percentiles and throughput, warm vs switching adapters,
and the cold-load cost of an adapter that is not in the replica's cache.

Bounded: at most --requests per scenario and --max-seconds per scenario; only 127.0.0.1 is contacted.
By default it builds the tiny FLUX model and three quickly trained adapters in a temp dir; pass --model and
--store to measure real ones (then --adapters names three ids in the store).

    PYTHONPATH=$PWD python benchmarks/serve_load.py [--requests 40] [--concurrency 4] [--steps 4] [--size 64]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

import httpx

from blockskip_ray.distributed.serve_run import free_port, running_app
from blockskip_ray.serving import build_tiny_adapter_store


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]  # nearest-rank percentile


async def scenario(url: str, adapters: list[str], n: int, concurrency: int, args) -> dict:
    """n requests cycling through `adapters`, `concurrency` in flight; returns latencies and throughput."""
    lat: list[float] = []
    caches: list[str] = []
    sem = asyncio.Semaphore(concurrency)
    deadline = time.perf_counter() + args.max_seconds
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i: int) -> None:
            async with sem:
                if time.perf_counter() > deadline:
                    return
                body = {"adapter": adapters[i % len(adapters)], "prompt": "a photo of sks toy", "seed": i,
                        "steps": args.steps, "width": args.size, "height": args.size}
                t = time.perf_counter()
                r = await client.post("/v1/images", json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                lat.append(time.perf_counter() - t)
                caches.append(r.headers["x-adapter-cache"])
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    return {"n": len(lat), "p50": pct(lat, 50), "p95": pct(lat, 95), "rps": len(lat) / wall,
            "hit": caches.count("hit") / max(1, len(caches))}


async def cold_load(url: str, adapters: list[str], args) -> tuple[float, float]:
    """Median latency of a cache miss vs a hit (cache size 2, cycling 3 adapters makes every request a miss)."""
    miss = await scenario(url, adapters, 6, 1, args)
    hit = await scenario(url, adapters[:1], 6, 1, args)
    return miss["p50"], hit["p50"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--store")
    ap.add_argument("--adapters", default="bench-a,bench-b,bench-c")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=120.0, help="time budget per scenario")
    ap.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per Generator replica")
    args = ap.parse_args()
    adapters = args.adapters.split(",")
    if len(adapters) != 3:
        raise SystemExit("--adapters takes three ids")
    tmp = tempfile.mkdtemp(prefix="serve-bench-")
    if args.model and args.store:
        model, store = args.model, args.store
    else:
        t = time.perf_counter()
        model, store = build_tiny_adapter_store(tmp, adapters)
        print(f"built tiny model + {len(adapters)} adapters in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    app_args = {"model": str(model), "store": str(store), "cache_size": 2, "num_cpus": args.num_cpus,
                "max_ongoing": 2, "max_queued": max(16, args.concurrency), "default_side": args.size,
                "min_side": min(64, args.size), "max_side": max(1024, args.size), "max_steps": max(50, args.steps)}
    rows = []
    with running_app(app_args, port=free_port(), ray_address=os.environ.get("RAY_ADDRESS", "local")) as url:
        asyncio.run(scenario(url, adapters[:2], 4, 1, args))  # warm up: both adapters loaded, code paths hot
        n, c = args.requests, args.concurrency
        for name, ads, conc in [("warm, 1 adapter, sequential", adapters[:1], 1),
                                (f"warm, 1 adapter, {c} concurrent", adapters[:1], c),
                                ("switching 2 cached adapters, sequential", adapters[:2], 1),
                                (f"switching 2 cached adapters, {c} concurrent", adapters[:2], c),
                                ("3 adapters, cache 2 (every request loads)", adapters, 1)]:
            rows.append((name, asyncio.run(scenario(url, ads, n, conc, args))))
        miss, hit = asyncio.run(cold_load(url, adapters, args))
    print(f"\n$ PYTHONPATH=$PWD python benchmarks/serve_load.py {' '.join(sys.argv[1:])}")
    print(f"image {args.size}x{args.size}, {args.steps} steps, 1 Generator replica ({args.num_cpus:g} CPU), cache 2\n")
    print(f"| scenario | requests | p50 ms | p95 ms | req/s | cache hits |")
    print(f"|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['n']} | {r['p50'] * 1e3:.0f} | {r['p95'] * 1e3:.0f} | {r['rps']:.2f} | {r['hit']:.0%} |")
    print(f"\ncold adapter load (median miss - median hit latency): {(miss - hit) * 1e3:.0f} ms "
          f"(miss {miss * 1e3:.0f} ms, hit {hit * 1e3:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

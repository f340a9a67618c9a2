"""Hostile-client run against the image service on loopback (bounded; only 127.0.0.1 is contacted).

Starts the tiny FLUX model with one adapter on a private local Ray (2 CPUs), token auth on, and measures:
  1. baseline: latency of /healthz and of an authenticated small image request;
  2. N stalled connections (default 200: half of them send headers + half a body with a valid token and go
     silent, half send half the headers) held open while /healthz, /v1/adapters and an image are requested;
  3. unauthenticated 10.7 MB bodies (3 in parallel, 1 MB actually sent): status and answer size;
  4. UTF-16 JSON and a wrong content type: status;
  5. K abandoned requests (max steps, the client gives up after 1 s), then one small request: its latency
     and the replica's count of cancelled generations and denoising steps run;
  6. a burst beyond the queue: 200 / 503 counts and the Retry-After header.
`--proxy-guard off` runs the same without the guard in Serve's HTTP proxy (the ingress still has it), to
show what the proxy-side guard buys against stalled clients.

    PYTHONPATH=$PWD python benchmarks/serve_abuse.py [--stalled 200] [--abandoned 5] [--proxy-guard on|off]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time

import httpx
import ray

from blockskip_ray.distributed.serve_run import environment, free_port, proxy_env, running_app
from blockskip_ray.http_guard import PROXY_CALLBACK_ENV
from blockskip_ray.serving import build_tiny_adapter_store

TOKEN = "abuse-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY = {"adapter": "toy-a", "prompt": "a photo of sks toy", "seed": 1, "steps": 2, "width": 64, "height": 64}


def timed(fn, *a, **kw) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - t, out


def med(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def latencies(c: httpx.Client, n: int) -> dict[str, float]:
    h = [timed(c.get, "/healthz")[0] for _ in range(n)]
    a = [timed(c.get, "/v1/adapters", headers=AUTH)[0] for _ in range(n)]
    img = []
    for _ in range(3):
        dt, r = timed(c.post, "/v1/images", json=BODY, headers=AUTH)
        assert r.status_code == 200, r.text
        img.append(dt)
    return {"healthz": med(h), "adapters": med(a), "image": med(img), "healthz_max": max(h)}


def stall(host: str, port: int, n: int) -> list[socket.socket]:
    socks = []
    for i in range(n):
        s = socket.create_connection((host, port), timeout=30)
        if i % 2:
            s.sendall(("POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       f"Authorization: Bearer {TOKEN}\r\nContent-Length: 200\r\n\r\n").encode() + b'{"adapter": ')
        else:
            s.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Ty")
        socks.append(s)
    return socks


def big_unauth(host: str, port: int) -> tuple[int, int, float]:
    t = time.perf_counter()
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(b"POST /v1/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10700000\r\n\r\n")
        try:
            s.sendall(b'{"adapter": "' + b"A" * 1_000_000)
        except OSError:
            pass
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data and data.endswith(b"}"):
                break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), len(body), time.perf_counter() - t


async def abandoned(url: str, k: int, steps: int) -> None:
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=1.0) as c:
        async def one(i: int) -> None:
            try:
                await c.post("/v1/images", json={**BODY, "seed": i, "steps": steps, "width": 128, "height": 128})
            except httpx.TimeoutException:
                pass
        await asyncio.gather(*(one(i) for i in range(k)))


async def burst(url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=300) as c:
        return await asyncio.gather(*(c.post("/v1/images", json={**BODY, "seed": i, "steps": 20})
                                      for i in range(n)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stalled", type=int, default=200)
    p.add_argument("--abandoned", type=int, default=5)
    p.add_argument("--abandoned-steps", type=int, default=400)
    p.add_argument("--burst", type=int, default=40)
    p.add_argument("--proxy-guard", choices=["on", "off"], default="on")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="serve-abuse-")
    model, store = build_tiny_adapter_store(root, ["toy-a"])
    app = {"model": str(model), "store": str(store), "token": TOKEN, "num_cpus": 1, "max_ongoing": 2,
           "max_queued": 8, "max_steps": args.abandoned_steps, "max_step_pixels": args.abandoned_steps * 128 * 128,
           "default_side": 64, "default_steps": 2}
    env = proxy_env(app)
    if args.proxy_guard == "off":
        env = {k: v for k, v in env.items() if k != PROXY_CALLBACK_ENV}
    port = free_port()
    rows: list[tuple[str, str]] = []
    with environment(env):
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with running_app(app, port=port) as url, httpx.Client(base_url=url, timeout=120) as c:
            c.post("/v1/images", json=BODY, headers=AUTH)  # warm up (adapter load)
            base = latencies(c, 10)
            rows.append(("baseline: /healthz, /v1/adapters, image (median s)",
                         f"{base['healthz']:.3f} / {base['adapters']:.3f} / {base['image']:.3f}"))

            socks = stall("127.0.0.1", port, args.stalled)
            time.sleep(2)
            try:
                with httpx.Client(base_url=url, timeout=60) as c2:
                    dt_h, r_h = timed(c2.get, "/healthz")
                    dt_a, r_a = timed(c2.get, "/v1/adapters", headers=AUTH)
                    dt_i, r_i = timed(c2.post, "/v1/images", json=BODY, headers=AUTH)
                rows.append((f"{args.stalled} stalled connections held: /healthz, /v1/adapters, image (s, status)",
                             f"{dt_h:.3f} ({r_h.status_code}) / {dt_a:.3f} ({r_a.status_code}) / "
                             f"{dt_i:.3f} ({r_i.status_code})"))
            except httpx.HTTPError as e:
                rows.append((f"{args.stalled} stalled connections held", f"FAILED: {type(e).__name__} within 60 s"))
            finally:
                for s in socks:
                    s.close()
            time.sleep(1)

            loop_results: list[tuple[int, int, float]] = []
            import threading
            ts = [threading.Thread(target=lambda: loop_results.append(big_unauth("127.0.0.1", port)))
                  for _ in range(3)]
            [t.start() for t in ts]
            [t.join() for t in ts]
            rows.append(("3 x unauthenticated 10.7 MB body (1 MB sent): status, answer bytes, seconds",
                         ", ".join(f"{s} {n} B {t:.2f} s" for s, n, t in loop_results)))
            dt, _ = timed(c.get, "/healthz")
            rows.append(("/healthz right after (s)", f"{dt:.3f}"))

            enc = json.dumps(BODY)
            r16 = c.post("/v1/images", content=enc.encode("utf-16"), headers={**AUTH, "content-type": "application/json"})
            rtp = c.post("/v1/images", content=enc.encode(), headers={**AUTH, "content-type": "text/plain"})
            rows.append(("UTF-16 JSON / text/plain content type", f"{r16.status_code} / {rtp.status_code}"))

            before = c.get("/v1/stats", headers=AUTH).json()["replica"]["generation"]
            asyncio.run(abandoned(url, args.abandoned, args.abandoned_steps))
            dt, r = timed(c.post, "/v1/images", json=BODY, headers=AUTH)
            time.sleep(2)
            after = c.get("/v1/stats", headers=AUTH).json()["replica"]["generation"]
            rows.append((f"{args.abandoned} abandoned {args.abandoned_steps}-step 128x128 requests, then a "
                         "2-step 64x64 one: its latency (s) vs baseline", f"{dt:.2f} vs {base['image']:.2f} "
                         f"(x{dt / base['image']:.1f}), status {r.status_code}"))
            rows.append(("  generations cancelled / denoising steps run for the abandoned ones",
                         f"{after['cancelled'] - before['cancelled']} / "
                         f"{after['steps'] - before['steps'] - 2} of {args.abandoned * args.abandoned_steps}"))

            rs = asyncio.run(burst(url, args.burst))
            codes = [r.status_code for r in rs]
            ra = {r.headers.get("retry-after") for r in rs if r.status_code == 503}
            rows.append((f"burst of {args.burst} (2 running + 8 queued allowed): 200 / 503, Retry-After",
                         f"{codes.count(200)} / {codes.count(503)}, {sorted(ra)}"))
    finally:
        ray.shutdown()
    print(f"proxy guard: {args.proxy_guard}")
    print("| scenario | result |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    print("command: PYTHONPATH=$PWD python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

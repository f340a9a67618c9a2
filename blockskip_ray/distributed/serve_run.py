"""Start/stop the image service on the current Ray cluster (a local one when none runs).

`run_server` backs `blockskip serve`: it deploys `build_app`, then waits until SIGINT/SIGTERM and shuts Serve
and Ray down so no Ray process is left behind. `serve_and_request` is the demo's last step: start, ask one
image per adapter over HTTP, save the PNGs, shut down.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import ray
from ray import serve

from ..http_guard import PROXY_CALLBACK, PROXY_CALLBACK_ENV, GuardConfig, token_digest
from .serve_app import TOKEN_ENV, build_app, guard_settings, parse_args

APP_NAME = "blockskip"
# Idle keep-alive connections are closed after this (Serve's default is 90 s): an idle socket is cheap, but
# there is no reason to hold thousands of them.
KEEP_ALIVE_TIMEOUT_S = 5


def proxy_env(args: dict[str, Any]) -> dict[str, str]:
    """Environment that makes Serve's HTTP proxy run the guard (token digest and limits of `args`).

    Ray's proxy actor reads it at start: it must be in the environment of the Ray cluster's processes, i.e.
    set before `ray.init` starts a local cluster, or in the pod spec on Kubernetes (cluster/kuberay)."""
    a = parse_args(args)
    token = a["token"] or os.environ.get(TOKEN_ENV)
    cfg = GuardConfig(digest=token_digest(token) if token else None, **guard_settings(a))
    return {PROXY_CALLBACK_ENV: PROXY_CALLBACK, **cfg.env()}


@contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    """Set `env` in os.environ for the block (what a Ray started inside it inherits), then restore."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def running_app(args: dict[str, Any], host: str = "127.0.0.1", port: int = 8000,
                num_cpus: int | None = None, ray_address: str | None = None,
                after_init: Callable[[], None] | None = None) -> Iterator[str]:
    """Deploy the app and yield its base URL; always clean up (Serve, and Ray when this started it).

    Uses the Ray this process is already connected to, else `ray_address` (default $RAY_ADDRESS; None lets
    Ray find a cluster running on this machine or start a local one; "local" always starts a private one).
    A Ray started here gets `proxy_env(args)`, so its HTTP proxy runs the guard; on a Ray started elsewhere
    the proxy runs it only if that cluster's environment has it (the ingress runs it in any case).
    """
    app = build_app(args)  # validate arguments before starting anything
    started_ray = False
    if not ray.is_initialized():
        address = ray_address or os.environ.get("RAY_ADDRESS")
        with environment(proxy_env(args)):
            ray.init(address=address, num_cpus=num_cpus if address in (None, "local") else None,
                     include_dashboard=False, log_to_driver=False)
        started_ray = True
    try:
        if after_init is not None:
            after_init()
        serve.start(http_options={"host": host, "port": port, "keep_alive_timeout_s": KEEP_ALIVE_TIMEOUT_S})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        yield f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()


def run_server(args: dict[str, Any], host: str, port: int) -> int:
    """Serve until SIGINT or SIGTERM, then shut down Serve and Ray cleanly."""
    stop = threading.Event()
    previous: dict[int, Any] = {}

    def handle_signals() -> None:
        # After ray.init: Ray's core worker installs its own SIGTERM handler (it aborts the driver, leaving
        # the cluster to die on its own); ours replaces it so shutdown goes through serve/ray.shutdown.
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, lambda *_: stop.set())

    try:
        with running_app(args, host, port, after_init=handle_signals) as url:
            auth = "on (Authorization: Bearer ...)" if (args.get("token") or os.environ.get(TOKEN_ENV)) else "off"
            print(f"serving {url}  (POST /v1/images, GET /v1/adapters, GET /healthz, docs at {url}/docs; "
                  f"auth {auth}); Ctrl-C to stop", flush=True)
            while not stop.wait(0.5):
                pass
            print("shutting down", flush=True)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


def serve_and_request(model: str | Path, store: str | Path, adapters: list[str], out_dir: str | Path,
                      prompt: str | dict[str, str] = "a photo of sks toy", steps: int = 4, size: int = 64,
                      seed: int = 0, timeout_s: float = 300.0) -> list[Path]:
    """Start the service, request one image per adapter over HTTP, save `out_dir/{adapter}.png`, shut down.

    `prompt` is one prompt for all adapters or a dict adapter id -> its subject's prompt."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store_uri = str(store) if "://" in str(store) else os.path.abspath(store)
    args = {"model": os.path.abspath(model), "store": store_uri, "num_cpus": 1, "default_side": size,
            "min_side": min(64, size), "max_side": max(1024, size), "default_steps": steps,
            "max_steps": max(50, steps)}
    paths = []
    # A private local Ray unless RAY_ADDRESS names one: the demo must not deploy onto a stranger's cluster.
    address = os.environ.get("RAY_ADDRESS", "local")
    with running_app(args, port=free_port(), ray_address=address) as url, \
            httpx.Client(base_url=url, timeout=timeout_s) as client:
        headers = {"Authorization": f"Bearer {os.environ[TOKEN_ENV]}"} if os.environ.get(TOKEN_ENV) else {}
        for adapter in adapters:
            r = client.post("/v1/images", json={"adapter": adapter, "seed": seed,
                                  "prompt": prompt[adapter] if isinstance(prompt, dict) else prompt},
                            headers=headers)
            if r.status_code != 200:
                raise RuntimeError(f"image for adapter {adapter!r} failed: HTTP {r.status_code} {r.text[:300]}")
            p = out / f"{adapter}.png"
            p.write_bytes(r.content)
            paths.append(p)
    return paths

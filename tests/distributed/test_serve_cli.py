"""`blockskip serve` as a process (SIGTERM stops it and every Ray process it started) and `serve_and_request`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import ray
from PIL import Image

from blockskip_ray.distributed.serve_run import free_port, serve_and_request
from blockskip_ray.serving import build_tiny_adapter_store

IDS = ["toy-a", "toy-b"]
# Only the serve command is registered, so this test does not depend on the other commands' modules.
CLI = ("import argparse, sys; from blockskip_ray.commands import serve; p = argparse.ArgumentParser(); "
       "serve.register(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return build_tiny_adapter_store(tmp_path_factory.mktemp("serve-cli"), IDS)


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


def test_serve_command_stops_cleanly_on_sigterm(adapters, tmp_path):
    model, store = adapters
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "BLOCKSKIP_API_TOKEN": "tok-1",
           "RAY_ADDRESS": "local"}  # a private cluster even when another Ray runs on this machine
    proc = subprocess.Popen(
        [sys.executable, "-c", CLI, "serve", "--model", str(model), "--store", str(store), "--port", str(port),
         "--default-side", "64", "--default-steps", "2", "--cache-size", "1"],
        env=env, stdout=open(tmp_path / "out.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400
        while True:
            assert proc.poll() is None, (tmp_path / "out.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(1)
        body = {"adapter": "toy-b", "prompt": "a photo of sks toy", "seed": 0}
        assert httpx.post(f"{url}/v1/images", json=body, timeout=120).status_code == 401  # token from the env
        r = httpx.post(f"{url}/v1/images", json=body, headers={"Authorization": "Bearer tok-1"}, timeout=120)
        assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
        ray_procs = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in ray_procs), "expected a private local Ray"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0, (tmp_path / "out.log").read_text()[-3000:]
        deadline = time.monotonic() + 30
        while _alive(ray_procs) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive(ray_procs), _alive(ray_procs)
        assert "shutting down" in (tmp_path / "out.log").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_serve_and_request(adapters, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # serve_and_request then starts a private local Ray
    model, store = adapters
    assert not ray.is_initialized()
    paths = serve_and_request(model, store, IDS, tmp_path / "pngs", steps=2, size=64)
    assert [p.name for p in paths] == ["toy-a.png", "toy-b.png"]
    assert all(Image.open(p).size == (64, 64) for p in paths)
    assert paths[0].read_bytes() != paths[1].read_bytes()
    assert not ray.is_initialized()  # it started its own Ray and shut it down

"""Issue 14 item 9: `address: auto` never hangs on a recorded-but-dead cluster; a bad explicit address is one
line. The recorded-address file is a temp dir of the test's own (never Ray's shared /tmp/ray)."""
from __future__ import annotations

import socket
import time

import pytest

from blockskip_ray.distributed import ray_address
from blockskip_ray.distributed.ray_address import resolve


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.fixture
def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield f"127.0.0.1:{s.getsockname()[1]}"
    s.close()


@pytest.fixture(autouse=True)
def no_env_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _record(tmp_path, address: str) -> str:
    (tmp_path / "ray_current_cluster").write_text(address + "\n")
    return str(tmp_path)


def test_recorded_dead_cluster_means_a_local_ray_in_seconds(tmp_path):
    temp = _record(tmp_path, f"127.0.0.1:{_dead_port()}")
    t0 = time.monotonic()
    r = resolve("auto", temp_dir=temp)
    assert r.address == "local" and "is not alive" in r.note and "starting a local Ray" in r.note
    assert time.monotonic() - t0 < 30  # seconds, not minutes (Ray's own auto retried the GCS for 6.5 min)
    assert resolve(None, temp_dir=temp).address == "local"


def test_recorded_live_cluster_is_joined_and_nothing_recorded_is_local(tmp_path, listener):
    assert resolve("auto", temp_dir=_record(tmp_path, listener)).address == listener
    assert resolve("auto", temp_dir=str(tmp_path / "empty")).address == "local"
    assert resolve("local", temp_dir=_record(tmp_path, listener)).address == "local"


def test_explicit_or_env_address_that_is_dead_fails_in_one_line(tmp_path, monkeypatch, listener):
    dead = f"127.0.0.1:{_dead_port()}"
    for address in (dead, f"ray://{dead}"):
        with pytest.raises(ValueError, match="is not reachable") as e:
            resolve(address, temp_dir=str(tmp_path))
        assert "\n" not in str(e.value)
    assert resolve(listener, temp_dir=str(tmp_path)).address == listener
    monkeypatch.setenv("RAY_ADDRESS", dead)
    with pytest.raises(ValueError, match="RAY_ADDRESS=.* is not reachable"):
        resolve("auto", temp_dir=str(tmp_path))


def test_job_with_a_dead_recorded_cluster_starts_a_local_ray(tmp_path, monkeypatch):
    """init_ray (what `blockskip run` / `select` use) with Ray's address file naming a dead head: a local Ray,
    said so, instead of hanging."""
    import ray

    from blockskip_ray.distributed.jobs import init_ray
    from blockskip_ray.distributed.jobspec import load_spec
    if ray.is_initialized():
        pytest.skip("Ray already initialized in this process")
    dead = f"127.0.0.1:{_dead_port()}"
    monkeypatch.setattr(ray_address, "recorded_address", lambda temp_dir=None: dead)
    logs: list[str] = []
    job = load_spec({"job_id": "j", "model": "m", "ray": {"address": "auto", "num_cpus": 1}})
    try:
        init_ray(job, log=logs.append)
        assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 1
    finally:
        ray.shutdown()
    assert any(dead in m and "not alive" in m and "starting a local Ray" in m for m in logs), logs

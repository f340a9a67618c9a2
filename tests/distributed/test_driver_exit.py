"""Issue 14 items 3 and 7: however the driver ends, no row stays `running` (the job-level reason is recorded and
`blockskip status` tells a finished driver from one that exited or died); one driver per job id (lease).

The driver runs in this test's main thread with Ray, precompute and training replaced by fakes that block until
the signal arrives, so the signal paths are exercised exactly, without a cluster."""
from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import blockskip_ray.distributed.jobs as jobs
import blockskip_ray.distributed.training as training
from blockskip_ray.distributed.jobspec import load_spec
from blockskip_ray.store import JobStatus, Store
from blockskip_ray.store.lease import Lease, LeaseHeld, describe_driver, lease_key


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from blockskip_ray.models.tiny import init_model
    return str(init_model("flux", tmp_path_factory.mktemp("model") / "tiny-flux"))


def _job(tiny: str, root: Path, n: int = 2):
    from blockskip_ray.method.images import make_synthetic_subject
    rows = []
    for i in range(n):
        make_synthetic_subject(root / f"s{i}", n=2, size=64, seed=i)
        rows.append({"id": f"s{i}", "images": str(root / f"s{i}"), "prompt": "p"})
    (root / "cat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_spec({"job_id": "drv", "model": tiny, "catalog": str(root / "cat.jsonl"), "store": str(root / "store"),
                      "work_dir": str(root / "work"), "train": {"resolution": 64, "skip": [1, 1]},
                      "ray": {"concurrency": 2}})


@pytest.fixture
def fakes(monkeypatch):
    """Training blocks until `release` is set; `started` is set once both subjects are running."""
    started, release = threading.Event(), threading.Event()
    running = []

    def fit(job, store, sid, spec, images, prompts):
        running.append(sid)
        if len(running) == 2:
            started.set()
        release.wait(60)
        raise RuntimeError("ray shut down under the subject")

    monkeypatch.setattr(jobs, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(jobs, "precompute_stage", lambda *a, **k: {})
    monkeypatch.setattr(training, "fit_subject", fit)
    yield started, release
    release.set()


def _signal_when(started: threading.Event, sig: int, release: threading.Event) -> threading.Thread:
    """Signal the process once both subjects run; the fake trainings stay blocked until the test's teardown
    (no timing assumption: the driver must not wait for them)."""
    def go():
        if started.wait(600):
            os.kill(os.getpid(), sig)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("sig, exc, reason, state", [
    (signal.SIGTERM, SystemExit, "driver exited: SIGTERM", "exited"),
    (signal.SIGINT, KeyboardInterrupt, "driver exited: SIGINT (Ctrl-C)", "exited"),
])
def test_signal_closes_running_rows(tiny, tmp_path, fakes, sig, exc, reason, state, capsys):
    started, release = fakes
    job = _job(tiny, tmp_path)
    _signal_when(started, sig, release)
    with pytest.raises(exc) as e:
        jobs.run_job(job, log=lambda m: None)
    if sig == signal.SIGTERM:
        assert e.value.code == 128 + signal.SIGTERM
    store = Store.open(job.store)
    rows = {r["subject_id"]: r for r in JobStatus(store, "drv").read()}
    assert {r["state"] for r in rows.values()} == {"failed"}
    assert all(r["error"] == reason and r["finished_at"] for r in rows.values())
    record = store.read_json("jobs/drv/driver.json")
    assert (record["state"], record["reason"]) == (state, reason)
    assert not store.exists(lease_key("drv"))  # released: a rerun may start at once
    from blockskip_ray.commands import status as status_cmd
    assert status_cmd.run(argparse.Namespace(job_id="drv", store=job.store, json=False)) == 0
    assert f"driver: {state}: {reason}" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the driver's handler is gone again


def test_exception_closes_running_rows_and_finish_is_recorded(tiny, tmp_path, monkeypatch):
    job = _job(tiny, tmp_path)
    monkeypatch.setattr(jobs, "init_ray", lambda *a, **k: None)

    def broken(job, store, model_dir, todo, skip, log):
        raise OSError("store unreachable after the retry budget")

    monkeypatch.setattr(jobs, "precompute_stage", broken)
    with pytest.raises(OSError):
        jobs.run_job(job, log=lambda m: None)
    store = Store.open(job.store)
    rows = JobStatus(store, "drv").read()
    reason = "driver failed: OSError: store unreachable after the retry budget"
    assert [(r["state"], r["error"]) for r in rows] == [("failed", reason)] * 2
    assert describe_driver(store, "drv").startswith(f"driver: failed: {reason}")
    # the rerun (store healthy, training fake) finishes and says so
    monkeypatch.setattr(jobs, "precompute_stage", lambda *a, **k: {})
    monkeypatch.setattr(training, "fit_subject", lambda *a, **k: {"loss": [1.0]})
    result = jobs.run_job(job, log=lambda m: None)
    assert sorted(result.succeeded) == ["s0", "s1"]
    assert describe_driver(store, "drv").startswith("driver: finished (ended ")


def test_second_driver_refuses_and_a_dead_drivers_lease_expires(tiny, tmp_path, monkeypatch):
    job = _job(tiny, tmp_path)
    store = Store.open(job.store)
    first = Lease(store, "drv", ttl_s=60).acquire()  # a live driver of the same job id
    monkeypatch.setattr(jobs, "init_ray", lambda *a, **k: pytest.fail("a second driver started work"))
    with pytest.raises(LeaseHeld, match=r"job drv is already running: its driver .* pid \d+ refreshed its lease"):
        jobs.run_job(job, log=lambda m: None)
    assert JobStatus(store, "drv").read() == []  # it wrote nothing
    first.release()
    # a driver that died (kill -9): its lease is never released, and expires on its own
    now = [1000.0]
    dead = Lease(store, "drv", ttl_s=10, clock=lambda: now[0]).acquire()
    dead._stop.set()  # its heartbeat thread is gone with the process
    from blockskip_ray.store.lease import write_driver_record
    write_driver_record(store, "drv", "running")
    assert "died without closing the job" in describe_driver(store, "drv", clock=lambda: time.time())
    with pytest.raises(LeaseHeld):
        Lease(store, "drv", ttl_s=10, clock=lambda: now[0] + 5).acquire()
    taker = Lease(store, "drv", ttl_s=10, clock=lambda: now[0] + 11).acquire()  # expired: taken over
    taker._stop.set()
    assert json.loads(store.read_bytes(lease_key("drv")))["owner"] == taker.owner
    with pytest.raises(Exception, match="lease lost"):
        dead.heartbeat()  # the stalled driver finds out at its next heartbeat


def test_lease_on_s3_uses_conditional_writes(s3_store):
    a = Lease(s3_store, "j3", ttl_s=60).acquire()
    with pytest.raises(LeaseHeld):
        Lease(s3_store, "j3", ttl_s=60).acquire()
    a.heartbeat()
    a.release()
    assert not s3_store.exists(lease_key("j3"))
    now = [0.0]
    b = Lease(s3_store, "j3", ttl_s=5, clock=lambda: now[0]).acquire()
    b._stop.set()
    c = Lease(s3_store, "j3", ttl_s=5, clock=lambda: now[0] + 6).acquire()
    c._stop.set()
    with pytest.raises(Exception, match="lease lost"):
        b.heartbeat()
    c.release()


@pytest.fixture
def s3_store(tmp_path):
    import boto3
    from moto.server import ThreadedMotoServer
    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    mp.setenv("AWS_CONFIG_FILE", os.devnull)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1").create_bucket(Bucket="lease")
    yield Store.open("s3://lease/p", endpoint_url=f"http://{host}:{port}")
    srv.stop()
    mp.undo()

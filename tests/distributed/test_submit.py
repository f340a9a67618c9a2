"""`blockskip submit` against a real Ray head with its job server, started and stopped by this test.

Teardown: the head runs as `ray start --head --block` in its own session (process group), and the test ends
exactly that group. `ray stop --force` is not used: it kills every Ray process on the machine, including other
users' clusters. The head gets its own --temp-dir (so its cluster-address file is not /tmp/ray's, and no dead
address is left behind for `address: auto`) and a free port for every listener (the fixed defaults, e.g. the
dashboard agent's 52365, clash with other Ray heads on a shared machine: "No available agent to submit job").
Waits are deadlines on a condition, generous enough for a loaded machine, never fixed sleeps.
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from blockskip_ray.distributed.submit import build_entrypoint, find_working_dir

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_entrypoint_and_working_dir(tmp_path):
    assert find_working_dir(ROOT / "jobs/demo-tiny.yaml") == ROOT
    ep = build_entrypoint(ROOT / "jobs/demo-tiny.yaml", ROOT, "s3://b/p", ["train.steps=3", "catalog=a b.jsonl"])
    assert ep == "python -m blockskip_ray.commands.run jobs/demo-tiny.yaml --store s3://b/p train.steps=3 " \
                 "'catalog=a b.jsonl'"
    (tmp_path / "j.yaml").write_text("job_id: x\nmodel: m\n")
    assert build_entrypoint(tmp_path / "j.yaml", tmp_path, None, []) == "blockskip run j.yaml"
    with pytest.raises(ValueError, match="must be inside the uploaded working dir"):
        build_entrypoint(tmp_path / "j.yaml", ROOT, None, [])


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if ray_bin is None:
        pytest.skip("no `ray` executable next to the Python running the tests")
    try:
        import ray.dashboard  # noqa: F401  (the job server is part of the dashboard: ray[default])
        import aiohttp  # noqa: F401
    except ImportError as e:
        pytest.skip(f"Ray dashboard / job server not installed (ray[default]): {e}")
    ports = {flag: _free_port() for flag in (
        "port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "node-manager-port", "object-manager-port", "ray-client-server-port")}
    temp_dir = tempfile.mkdtemp(prefix="bs-head-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # Ray 2.60 turns token authentication on for new clusters: give this head its own token, and the client
    # (JobSubmissionClient in this process) the same one through Ray's own settings.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}",
         *[f"--{flag}={port}" for flag, port in ports.items()]],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    import httpx
    deadline = time.monotonic() + 600  # a deadline on a condition: a loaded machine may take minutes
    while True:
        try:
            # any answer means the server is up (401 while Ray's token authentication is on)
            if httpx.get(f"{address}/api/version", timeout=2).status_code < 500:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            shutil.rmtree(temp_dir, ignore_errors=True)
            pytest.skip(f"the Ray head / job server did not come up on {address} (see {log.name})")
        time.sleep(1)
    try:
        yield address
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)  # with it the head's (now dead) cluster-address file
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _stop(proc: subprocess.Popen) -> None:
    # The head's whole process group is ours (start_new_session): SIGTERM, then SIGKILL what is left.
    # `ray start --block` takes >20 s to exit on SIGTERM (measured); its temp dir is ours and removed after.
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    try:  # children that outlived the `ray start --block` parent still carry its group id
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_submit_runs_blockskip_run_on_the_cluster(head, tmp_path, capsys):
    from blockskip_ray.commands import submit as submit_cmd
    # A self-contained working dir: this checkout's package + the job spec (what a user's checkout uploads).
    wd = tmp_path / "wd"
    shutil.copytree(ROOT / "blockskip_ray", wd / "blockskip_ray", ignore=shutil.ignore_patterns("__pycache__"))
    (wd / "job.yaml").write_text(
        "# blockskip submit job.yaml --address ...\n"
        "job_id: submitted\nmodel: tiny:flux\ncatalog: null\nwork_dir: work\n"
        "selection: {enabled: false}\n")
    store = tmp_path / "store"
    code = submit_cmd.run(argparse.Namespace(
        job=str(wd / "job.yaml"), address=head, store=str(store), working_dir=None, python="python", wait=True,
        timeout=1200, overrides=["ray.num_cpus=1"]))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "SUCCEEDED" in out and "joined the Ray cluster" in out  # the submitted job ran on that head
    assert "selection.enabled=false" in out
    assert store.is_dir()  # the job opened the store given with --store


def test_submit_rejects_bad_override_before_uploading(head, tmp_path):
    from blockskip_ray.distributed.submit import submit
    with pytest.raises(ValueError, match="unknown key 'train.stepz'"):
        submit(ROOT / "jobs/demo-tiny.yaml", head, overrides=["train.stepz=3"])

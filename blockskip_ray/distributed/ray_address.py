"""Which Ray to use, decided in seconds: `address: auto` never hangs on a cluster that is recorded but dead.

`ray.init(address="auto")` trusts Ray's cluster-address file (/tmp/ray/ray_current_cluster, written by
`ray start`); when that head is gone (killed, machine rebooted, a test ended its process group) it keeps
retrying the GCS for minutes ("Failed to connect to GCS ... within 5 seconds" every ~40 s). Here the address
is resolved first and its GCS port probed with a TCP connect (a few seconds at most):

- "auto" / None: $RAY_ADDRESS, else the recorded address; alive -> that address; recorded but not reachable ->
  "local" (the caller starts a local Ray and says so); nothing recorded -> "local". Other Rays merely running
  on this machine (someone's `ray.init()`) are never joined implicitly.
- "local": a private local Ray.
- anything else (host:port, ray://host:port): probed too; not reachable -> ValueError, one line (the CLI
  prints it and exits 2).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Callable

PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Resolved:
    address: str  # what to pass to ray.init: "local" or host:port / ray://host:port
    note: str  # one line for the user: where this decision came from


def address_file(temp_dir: str | None = None) -> str:
    """Ray's cluster-address file (the one `ray start` writes and address='auto' reads)."""
    from ray._common.utils import get_ray_address_file
    return get_ray_address_file(temp_dir)


def recorded_address(temp_dir: str | None = None) -> str | None:
    path = address_file(temp_dir)
    try:
        with open(path) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def reachable(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to the address's host:port opens within timeout_s."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return False
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve(address: str | None, temp_dir: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> Resolved:
    if address == "local":
        return Resolved("local", "a private local Ray (ray.address=local)")
    if address not in (None, "auto"):
        if not reachable(address, timeout_s):
            raise ValueError(f"Ray cluster at {address} is not reachable (no TCP connection within "
                                  f"{timeout_s:.0f} s); check the address or start the cluster")
        return Resolved(address, f"joined the Ray cluster at {address}")
    env = os.environ.get("RAY_ADDRESS")
    if env and env not in ("auto", "local"):
        if not reachable(env, timeout_s):
            raise ValueError(f"RAY_ADDRESS={env} is not reachable (no TCP connection within "
                                  f"{timeout_s:.0f} s); unset it to start a local Ray")
        return Resolved(env, f"joined the Ray cluster at $RAY_ADDRESS={env}")
    recorded = recorded_address(temp_dir)
    if recorded is None:
        return Resolved("local", "no Ray cluster recorded on this machine: starting a local Ray")
    if reachable(recorded, timeout_s):
        return Resolved(recorded, f"joined the Ray cluster at {recorded} (recorded in {address_file(temp_dir)})")
    return Resolved("local", f"the Ray cluster recorded in {address_file(temp_dir)} ({recorded}) is not alive "
                             f"(no TCP connection within {timeout_s:.0f} s): starting a local Ray instead")


def init(address: str | None, num_cpus: int | None = None, log: Callable[[str], None] = print,
         local_kwargs: dict | None = None, **init_kwargs) -> Resolved:
    """ray.init on the resolved address (a local Ray with num_cpus and local_kwargs when there is none);
    logs which one."""
    import ray

    r = resolve(address)
    if r.address == "local":
        ray.init(address="local", num_cpus=num_cpus, **{**init_kwargs, **(local_kwargs or {})})
    else:
        ray.init(address=r.address, **init_kwargs)
    res = ray.cluster_resources()
    log(f"{r.note} ({res.get('CPU', 0):.0f} CPUs, {res.get('GPU', 0):.0f} GPUs)")
    return r


__all__ = ["resolve", "init", "reachable", "recorded_address", "address_file", "Resolved", "PROBE_TIMEOUT_S"]

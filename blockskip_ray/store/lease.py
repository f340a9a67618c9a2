"""One driver per job id: a lease object with a heartbeat, and the job's driver record.

    jobs/{job_id}/lease.json    {owner, host, pid, acquired_at, heartbeat_at, expires_at}  while a driver runs
    jobs/{job_id}/driver.json   {state: running|finished|failed|exited, reason, host, pid, started_at, ended_at}

A driver acquires the lease before it writes anything else for the job and refreshes it from a thread every
``ttl_s / 4``; a second `blockskip run` of the job id finds a live lease and refuses with who holds it. A driver
that dies without releasing (kill -9, lost machine) stops refreshing, and its lease expires on its own after
``ttl_s``; the next run takes it over. Ending normally or by an exception/signal, the driver writes its final
state to driver.json and deletes the lease, so `blockskip status` tells "finished" from "exited: SIGTERM" from
"died" (driver.json still says running but the lease expired or is gone).

Writes are conditional where the store can do it, so two drivers racing for the same lease cannot both win:
S3 uses PutObject with If-None-Match: * (create) and If-Match: ETag (takeover, heartbeat); a local store uses
O_CREAT|O_EXCL and an atomic rename of the expired lease. The window that remains: an S3-compatible store that
ignores the conditional headers (older MinIO, some gateways) lets two drivers that read an expired lease in the
same instant both take it over; the loser's next heartbeat then finds a foreign lease and stops its driver.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable

from .ids import validate_id
from .uri import Store

__all__ = ["Lease", "LeaseHeld", "LeaseLost", "lease_key", "driver_key", "write_driver_record",
           "describe_driver", "DEFAULT_TTL_S"]

DEFAULT_TTL_S = 60.0


class LeaseHeld(ValueError):
    """Another live driver holds the job's lease (a ValueError: the CLI prints it as one line, exit 2)."""


class LeaseLost(RuntimeError):
    """This driver's lease was taken over (it expired while this driver was stalled)."""


def lease_key(job_id: str) -> str:
    return f"jobs/{validate_id(job_id, kind='job id')}/lease.json"


def driver_key(job_id: str) -> str:
    return f"jobs/{validate_id(job_id, kind='job id')}/driver.json"


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass
class LeaseRecord:
    owner: str
    host: str
    pid: int
    acquired_at: float
    heartbeat_at: float
    expires_at: float

    def to_bytes(self) -> bytes:
        return json.dumps({**asdict(self), "expires_at_utc": _iso(self.expires_at)}, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> "LeaseRecord | None":
        try:
            d = json.loads(data)
            return cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError):
            return None  # a damaged lease counts as expired


class _Precondition(Exception):
    """A conditional write lost the race."""


class Lease:
    """Acquire with :meth:`acquire` (raises LeaseHeld), keep with the heartbeat thread, end with :meth:`release`."""

    def __init__(self, store: Store, job_id: str, ttl_s: float = DEFAULT_TTL_S,
                 on_lost: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store, self.job_id, self.ttl_s = store, validate_id(job_id, kind="job id"), float(ttl_s)
        self.key = lease_key(job_id)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.on_lost, self.clock = on_lost, clock
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    # ------------------------------------------------------------ storage
    def _read(self) -> tuple[LeaseRecord | None, str | None, bool]:
        """(record, etag, exists)."""
        if self.store.is_local:
            path = self.store.local_path / self.key  # type: ignore[operator]
            try:
                return LeaseRecord.parse(path.read_bytes()), None, True
            except FileNotFoundError:
                return None, None, False
        full = self.store.fs_path(self.key).split("/", 1)[1]
        try:
            obj = self.store._client().get_object(Bucket=self.store._bucket, Key=full)  # noqa: SLF001
        except Exception as e:  # noqa: BLE001
            if getattr(e, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None, False
            raise
        return LeaseRecord.parse(obj["Body"].read()), obj["ETag"], True

    def _write(self, rec: LeaseRecord, *, create: bool, etag: str | None) -> None:
        """Create (must not exist) or replace (must still be `etag` / our file); _Precondition when raced."""
        data = rec.to_bytes()
        if self.store.is_local:
            path = self.store.local_path / self.key  # type: ignore[operator]
            path.parent.mkdir(parents=True, exist_ok=True)
            if create:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    raise _Precondition() from None
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                return
            current = LeaseRecord.parse(path.read_bytes()) if path.exists() else None
            if current is None or current.owner != rec.owner:
                raise _Precondition()
            tmp = path.with_name(f".tmp-lease-{rec.owner.replace(':', '-')}")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return
        full = self.store.fs_path(self.key).split("/", 1)[1]
        cond = {"IfNoneMatch": "*"} if create else {"IfMatch": etag}
        try:
            resp = self.store._client().put_object(Bucket=self.store._bucket, Key=full, Body=data,  # noqa: SLF001
                                                   ContentType="application/json", **cond)
        except Exception as e:  # noqa: BLE001
            if getattr(e, "response", {}).get("Error", {}).get("Code") in ("PreconditionFailed", "412",
                                                                             "ConditionalRequestConflict"):
                raise _Precondition() from None
            raise
        self._etag = resp.get("ETag")

    def _break_expired(self, etag: str | None) -> None:
        """Remove an expired lease so a create can follow (local: an atomic rename that only one driver wins)."""
        if self.store.is_local:
            path = self.store.local_path / self.key  # type: ignore[operator]
            try:
                os.replace(path, path.with_name(f".expired-lease-{uuid.uuid4().hex[:8]}"))
            except FileNotFoundError:
                raise _Precondition() from None
            for p in path.parent.glob(".expired-lease-*"):
                p.unlink(missing_ok=True)

    # ------------------------------------------------------------ public
    def acquire(self) -> "Lease":
        now = self.clock()
        rec = LeaseRecord(self.owner, socket.gethostname(), os.getpid(), now, now, now + self.ttl_s)
        for _ in range(3):
            current, etag, exists = self._read()
            try:
                if not exists:
                    self._write(rec, create=True, etag=None)
                elif current is not None and current.expires_at > self.clock():
                    raise LeaseHeld(
                        f"job {self.job_id} is already running: its driver {current.host} pid {current.pid} "
                        f"refreshed its lease {max(0.0, self.clock() - current.heartbeat_at):.0f} s ago "
                        f"({self.store.url(self.key)}); wait for it to end, or, if it died, for the lease to "
                        f"expire at {_iso(current.expires_at)} ({self.ttl_s:.0f} s after its last heartbeat)")
                elif self.store.is_local:
                    self._break_expired(etag)
                    self._write(rec, create=True, etag=None)
                else:
                    rec.owner = self.owner
                    self._write(rec, create=False, etag=etag)  # take over exactly the expired one we read
                return self._start()
            except _Precondition:
                continue  # someone else wrote in between: look again
        raise LeaseHeld(f"job {self.job_id}: another driver is acquiring its lease at the same time")

    def _start(self) -> "Lease":
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def heartbeat(self) -> None:
        now = self.clock()
        current, etag, exists = self._read()
        if current is None or current.owner != self.owner:
            holder = f"{current.host} pid {current.pid}" if current else "nobody (deleted)"
            raise LeaseLost(f"job {self.job_id}: lease lost to {holder}")
        current.heartbeat_at, current.expires_at = now, now + self.ttl_s
        try:
            self._write(current, create=False, etag=etag)
        except _Precondition:
            raise LeaseLost(f"job {self.job_id}: lease taken over during the heartbeat") from None

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.heartbeat()
            except LeaseLost as e:
                self.lost = str(e)
                if self.on_lost:
                    self.on_lost(str(e))
                return
            except Exception:  # noqa: BLE001 - a store outage: keep trying until the lease would expire
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost:
            return
        current, _, _ = self._read()
        if current is not None and current.owner == self.owner:
            self.store.delete(self.key)


def write_driver_record(store: Store, job_id: str, state: str, reason: str | None = None,
                        started_at: float | None = None) -> dict[str, Any]:
    rec = {"job_id": job_id, "state": state, "reason": reason, "host": socket.gethostname(), "pid": os.getpid(),
           "started_at": _iso(started_at) if started_at else None,
           "ended_at": None if state == "running" else _iso(time.time())}
    store.write_json(driver_key(job_id), rec)
    return rec


def describe_driver(store: Store, job_id: str, clock: Callable[[], float] = time.time) -> str | None:
    """One line about the job's driver for `blockskip status`, or None when no driver record exists."""
    try:
        rec = store.read_json(driver_key(job_id))
    except (FileNotFoundError, ValueError):
        return None
    where = f"{rec.get('host')} pid {rec.get('pid')}"
    if rec.get("state") != "running":
        why = f": {rec['reason']}" if rec.get("reason") else ""
        return f"driver: {rec['state']}{why} (ended {rec.get('ended_at')}, {where})"
    try:
        lease = LeaseRecord.parse(store.read_bytes(lease_key(job_id)))
    except FileNotFoundError:
        lease = None
    if lease is not None and lease.expires_at > clock():
        return f"driver: running on {where}, last heartbeat {max(0.0, clock() - lease.heartbeat_at):.0f} s ago"
    last = f"last heartbeat {_iso(lease.heartbeat_at)}" if lease else "no lease"
    return (f"driver: died without closing the job ({where}, {last}); rows it left `running` are stale: "
            f"rerun the job to continue it")

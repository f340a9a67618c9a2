"""Status bookkeeping of a large catalog against a local S3 server (moto): store requests and bytes per change.

    PYTHONPATH=. python benchmarks/status_bookkeeping.py --subjects 10000

No training: a driver-side `JobStatus` records what `run_job` records for every subject (one bulk row set
at validation, then train running -> succeeded per subject, then the final compaction), written behind as
the driver does (store/status.py: changes made while a PUT is in flight go into the next event), and, on a
sample, synchronously (one PUT per change: what a change costs when changes are further apart than a PUT). The whole job runs
against moto directly and counts the store operations (each is one S3 request for these small objects);
its first `--http-sample` subjects run first through an HTTP proxy that counts the requests really sent,
to check that count. Side by side, the previous scheme (read the whole status.parquet, rewrite it, read it
again for the counts, on every change) is timed on a sample of changes at the same catalog size.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "bench-status"


def _proxy_module():
    spec = importlib.util.spec_from_file_location("_proxy", ROOT / "tests" / "store" / "store_fault_proxy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_proxy"] = mod
    spec.loader.exec_module(mod)
    return mod


class Ops:
    """Store operations (read, write, list, delete, exists), counted at Store._call."""

    def __init__(self, store) -> None:
        self.n: dict[str, int] = {}
        call = store._call

        def counted(op, key, fn):
            self.n[op] = self.n.get(op, 0) + 1
            return call(op, key, fn)

        store._call = counted

    @property
    def total(self) -> int:
        return sum(self.n.values())


class Bytes:
    """Bytes moved through a Store's whole-object reads and writes."""

    def __init__(self, store) -> None:
        self.read = self.written = 0
        rb, wb = store.read_bytes, store.write_bytes

        def read_bytes(key):
            data = rb(key)
            self.read += len(data)
            return data

        def write_bytes(key, data):
            self.written += len(data)
            return wb(key, data)

        store.read_bytes, store.write_bytes = read_bytes, write_bytes


def old_change(store, key: str, sid: str, state: str) -> None:
    """One change under the previous scheme: read the table, upsert, rewrite it, read it again for counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = pq.read_table(io.BytesIO(store.read_bytes(key))).to_pylist()
    for r in rows:
        if r["subject_id"] == sid:
            r["state"] = state
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    store.write_bytes(key, buf.getvalue())
    pq.read_table(io.BytesIO(store.read_bytes(key))).column("state").to_pylist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=10_000)
    ap.add_argument("--compact-every", type=int, default=1000)
    ap.add_argument("--old-sample", type=int, default=50, help="changes timed under the previous scheme")
    ap.add_argument("--sync-sample", type=int, default=1000, help="subjects whose changes are timed with the "
                    "synchronous writer (one PUT per change)")
    ap.add_argument("--http-sample", type=int, default=200, help="subjects whose changes go through the "
                    "request-counting proxy")
    args = ap.parse_args()

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ[k] = v
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from blockskip_ray.store import JobStatus, Store
    from blockskip_ray.store.status import utc_now

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1").create_bucket(Bucket=BUCKET)
    proxy = _proxy_module().FaultProxy(host, port).start()
    endpoint = f"http://{host}:{port}"
    try:
        # 1. HTTP requests per change, counted by the proxy, on a small job
        small = Store.open(f"s3://{BUCKET}/http", endpoint_url=proxy.endpoint)
        jh = JobStatus(small, "bench", compact_every=min(args.compact_every, args.http_sample))
        jh.set_many([{"subject_id": f"s-{i:05d}", "state": "running"} for i in range(args.http_sample)])
        proxy.clear()
        for i in range(args.http_sample):
            jh.update(f"s-{i:05d}", stage="train", state="running", attempts=1)
            jh.update(f"s-{i:05d}", stage="done", state="succeeded", finished_at=utc_now())
        http_per_change = len(proxy.seen) / (2 * args.http_sample)
        by_method: dict[str, int] = {}
        for s in proxy.seen:
            by_method[s.method] = by_method.get(s.method, 0) + 1

        # 2. the whole job, straight to moto, store operations counted
        store = Store.open(f"s3://{BUCKET}/new", endpoint_url=endpoint)
        moved, ops = Bytes(store), Ops(store)
        ids = [f"s-{i:05d}" for i in range(args.subjects)]
        js = JobStatus(store, "bench", compact_every=args.compact_every, write_behind=True)  # as run_job
        t0 = time.perf_counter()
        js.set_many([{"subject_id": s, "stage": "precompute", "state": "running", "started_at": utc_now()}
                     for s in ids])
        changes = 1
        for s in ids:
            js.update(s, stage="train", state="running", attempts=1)
            js.update(s, stage="done", state="succeeded", finished_at=utc_now())
            changes += 2
            js.counts()  # what Progress prints after every change
        js.compact()
        wall = time.perf_counter() - t0
        requests = ops.total
        t1 = time.perf_counter()
        reader = JobStatus(Store.open(f"s3://{BUCKET}/new", endpoint_url=endpoint), "bench").read()
        read_s = time.perf_counter() - t1
        assert len(reader) == args.subjects and all(r["state"] == "succeeded" for r in reader)

        # the synchronous writer (one PUT per change), on a sample of subjects
        sync = Store.open(f"s3://{BUCKET}/sync", endpoint_url=endpoint)
        sync_ops = Ops(sync)
        jsync = JobStatus(sync, "bench", compact_every=args.compact_every)
        jsync.set_many([{"subject_id": s, "state": "running"} for s in ids])
        sync_ops.n.clear()
        t3 = time.perf_counter()
        for s in ids[:args.sync_sample]:
            jsync.update(s, stage="train", state="running", attempts=1)
            jsync.update(s, stage="done", state="succeeded", finished_at=utc_now())
        sync_s = (time.perf_counter() - t3) / (2 * args.sync_sample)
        sync_req = sync_ops.total / (2 * args.sync_sample)

        # the previous scheme, on a sample of changes against a table of the same size
        old = Store.open(f"s3://{BUCKET}/old", endpoint_url=endpoint)
        old_bytes, old_ops = Bytes(old), Ops(old)
        import pyarrow as pa
        import pyarrow.parquet as pq
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist([{"subject_id": s, "stage": "train", "state": "running", "error": None,
                                              "attempts": 1, "started_at": utc_now().isoformat(),
                                              "finished_at": None} for s in ids]), buf)
        old.write_bytes("jobs/bench/status.parquet", buf.getvalue())
        old_bytes.read = old_bytes.written = 0
        old_ops.n.clear()
        t2 = time.perf_counter()
        for s in ids[:args.old_sample]:
            old_change(old, "jobs/bench/status.parquet", s, "succeeded")
        old_s = (time.perf_counter() - t2) / args.old_sample
        old_req = old_ops.total / args.old_sample
        old_b = (old_bytes.read + old_bytes.written) / args.old_sample
    finally:
        proxy.stop()
        server.stop()

    print(f"machine: {platform.node()} ({os.cpu_count()} CPUs), python {platform.python_version()}, moto S3 server "
          f"on 127.0.0.1; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"HTTP requests per change through the counting proxy, synchronous writer ({args.http_sample} subjects, "
          f"{2 * args.http_sample} changes): {http_per_change:.2f} {dict(sorted(by_method.items()))}")
    print(f"subjects {args.subjects}, state changes {changes} (bulk validate + running + succeeded each), "
          f"compact_every {args.compact_every}")
    print(f"{'scheme':<34}{'store ops/change':>16}{'bytes/change':>14}{'s/change':>11}{'job total (s)':>15}")
    print(f"{'events, written behind (now)':<34}{requests / changes:>16.3f}"
          f"{(moved.read + moved.written) / changes:>14,.0f}{wall / changes:>11.5f}{wall:>15.1f}")
    print(f"{'events, synchronous':<34}{sync_req:>16.3f}{'':>14}{sync_s:>11.5f}{sync_s * changes:>15.1f}"
          f"  (extrapolated from {2 * args.sync_sample} changes)")
    print(f"{'rewrite whole table (before)':<34}{old_req:>16.2f}{old_b:>14,.0f}{old_s:>11.4f}"
          f"{old_s * changes:>15.1f}  (extrapolated from {args.old_sample} changes)")
    print(f"store operations (written behind): {dict(sorted(ops.n.items()))}")
    print(f"a fresh reader (table + pending events) read all {args.subjects} rows in {read_s:.2f} s")
    print(f"bytes per change, before / now: {old_b / max(1.0, (moved.read + moved.written) / changes):.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

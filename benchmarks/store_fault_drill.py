"""Store fault drill: how long an S3 outage each kind of store call rides out (issue 14 item 1).

A moto S3 server on 127.0.0.1 behind the tests' fault proxy (tests/store/store_fault_proxy.py). For each outage
length and kind (every request answered 503 SlowDown, or its connection reset), the outage starts and at that
moment one call of each kind starts, in parallel, through the production code with the default retry policy
(store/retry.py, or --budget / --max-attempts):

    status     Store.write_table (pyarrow PutObject)         the driver's status table
    adapter    store/adapters.put_adapter (pyarrow)          a worker's adapter upload
    features   Store.write_bytes of a feature shard (boto3)  precompute (tagged objects)
    read       Store.read_bytes (pyarrow HEAD + GET)         training reads, resume
    checkpoint pyarrow.fs.copy_files to the pickled Store.filesystem, as Ray Train persists a checkpoint

It prints one row per (kind, outage, call): survived or the error, seconds until the call returned, and the
requests the proxy saw for it. Usage:

    python benchmarks/store_fault_drill.py [--outages 1,10,30,60,90] [--kinds status,drop] [--budget 100]
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "store"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outages", default="1,10,30,60,90", help="outage lengths in seconds")
    ap.add_argument("--kinds", default="status,drop", help="status (503 SlowDown) and/or drop (connection reset)")
    ap.add_argument("--budget", type=float, default=None, help="retry budget in seconds (default: the policy's)")
    ap.add_argument("--max-attempts", type=int, default=None, help="pin the attempt count instead")
    args = ap.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="drill", AWS_SECRET_ACCESS_KEY="drill", AWS_DEFAULT_REGION="us-east-1",
                      AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    import logging

    import boto3
    import pyarrow as pa
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer
    from store_fault_proxy import FaultProxy

    from blockskip_ray.store import Store, put_adapter
    from blockskip_ray.store.retry import RetryPolicy
    from blockskip_ray.store.s3conf import take_failed_uploads

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1").create_bucket(Bucket="drill")
    proxy = FaultProxy(host, port).start()
    kw = {k: v for k, v in (("budget_s", args.budget), ("max_attempts", args.max_attempts)) if v is not None}
    policy = RetryPolicy(**kw) if kw else RetryPolicy.from_env()
    store = Store.open("s3://drill/run", endpoint_url=proxy.endpoint, retry=policy)
    worker_fs = pickle.loads(pickle.dumps(store.filesystem))  # what a Ray Train worker holds
    store.write_bytes("subjects/a/samples/x.png", b"\x89PNG read me")
    local = Path(tempfile.mkdtemp(prefix="drill-"))
    (local / "adapter").mkdir()
    (local / "adapter" / "pytorch_lora_weights.safetensors").write_bytes(b"w" * 1000)
    (local / "ckpt").mkdir()
    (local / "ckpt" / "state.safetensors").write_bytes(b"s" * 1000)
    buf = io.BytesIO()
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"x": [1]}), buf)

    def calls(tag: str) -> dict:
        def checkpoint() -> None:
            take_failed_uploads()
            pafs.copy_files(str(local / "ckpt"), store.fs_path(f"subjects/a/checkpoints/{tag}/c"),
                            source_filesystem=pafs.LocalFileSystem(), destination_filesystem=worker_fs)
            failed = take_failed_uploads()
            if failed:
                raise OSError(f"upload failed (copy_files reported success): {failed[0][:120]}")
        return {
            "status": lambda: store.write_table(f"jobs/{tag}/status.parquet", pa.table({"x": [1]})),
            "adapter": lambda: put_adapter(store, f"ad-{tag}", local / "adapter"),
            "features": lambda: store.write_bytes(f"subjects/f-{tag}/features/shard-00000.safetensors", b"f"),
            "read": lambda: store.read_bytes("subjects/a/samples/x.png"),
            "checkpoint": checkpoint,
        }

    paths = {"status": "/jobs/{t}/", "adapter": "/ad-{t}/", "features": "/f-{t}/", "read": "/samples/x.png",
             "checkpoint": "/checkpoints/{t}/"}
    print(f"# retry policy: {policy.describe()}")
    print("# requests: those whose URL path names the call's key (listings with a URL-encoded prefix are not counted)")
    print(f"# {'kind':<7} {'outage_s':>8}  {'call':<10} {'result':<9} {'seconds':>8} {'requests':>8}  error")
    for kind in args.kinds.split(","):
        for outage in [float(x) for x in args.outages.split(",")]:
            tag = f"{kind}-{outage:g}".replace(".", "_")
            proxy.clear()
            proxy.outage(outage, kind=kind, code="SlowDown")
            t0 = time.monotonic()
            out: dict[str, tuple] = {}

            def run(name, fn):
                try:
                    fn()
                    out[name] = ("survived", time.monotonic() - t0, "")
                except Exception as e:  # noqa: BLE001 - the drill reports every failure
                    out[name] = ("FAILED", time.monotonic() - t0, str(e).splitlines()[0][:110])

            threads = [threading.Thread(target=run, args=item) for item in calls(tag).items()]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seen = list(proxy.seen)
            for name in calls(tag):
                res, secs, err = out[name]
                n = sum(1 for s in seen if paths[name].format(t=tag) in s.path)
                print(f"  {kind:<7} {outage:>8g}  {name:<10} {res:<9} {secs:>8.1f} {n:>8}  {err}", flush=True)
    proxy.stop()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

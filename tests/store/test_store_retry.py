"""Issue 14 items 1-2: one retry policy carried out by the S3 libraries (counted against a server that answers
503 to everything), kept by the filesystem Ray Train receives (pickled), and credentials that change mid-run."""
from __future__ import annotations

import json
import os
import pickle
import stat
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.fs as pafs
import pytest

from blockskip_ray.store import Store
from blockskip_ray.store.retry import RetryPolicy
from blockskip_ray.store.s3conf import take_failed_uploads

from conftest import BUCKET, unique_prefix


class _Always503(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[str] = []

    def _reply(self) -> None:
        self.seen.append(f"{self.command} {self.path}")
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        body = b"<Error><Code>ServiceUnavailable</Code><Message>down</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")  # each attempt on a fresh connection: exact counts
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _reply

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def down(aws_env):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Always503)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _Always503.seen
    srv.shutdown()


def test_default_policy_numbers_match_the_docs():
    p = RetryPolicy()
    assert (p.budget_s, p.pyarrow_attempts(), p.botocore_attempts()) == (100.0, 13, 19)
    assert round(p.pyarrow_wait_s()) == 102 and [round(x) for x in p.botocore_wait_s()] == [103, 206]
    assert RetryPolicy(max_attempts=4).pyarrow_attempts() == RetryPolicy(max_attempts=4).botocore_attempts() == 4
    with pytest.raises(ValueError, match="standard or adaptive"):
        RetryPolicy(mode="legacy")


def test_env_overrides(monkeypatch):
    monkeypatch.setenv("BLOCKSKIP_S3_RETRY_BUDGET_S", "1")
    assert RetryPolicy.from_env().pyarrow_attempts() == 7  # 25 ms * (2**6 - 1) = 1.6 s >= 1 s
    monkeypatch.setenv("BLOCKSKIP_S3_MAX_ATTEMPTS", "6")
    assert RetryPolicy.from_env().botocore_attempts() == 6
    monkeypatch.setenv("BLOCKSKIP_S3_MAX_ATTEMPTS", "six")
    with pytest.raises(ValueError, match="BLOCKSKIP_S3_MAX_ATTEMPTS"):
        RetryPolicy.from_env()


def test_attempt_counts_on_every_path(down):
    """Real requests per call against an always-503 server: the Store's pyarrow path, its boto3 path (tagged
    feature write), and the filesystem after a pickle round trip, written through pyarrow.fs.copy_files exactly
    as Ray Train persists a checkpoint."""
    endpoint, seen = down
    policy = RetryPolicy(budget_s=1.0)
    store = Store.open(f"s3://{BUCKET}/p", endpoint_url=endpoint, retry=policy)
    seen.clear()
    with pytest.raises(OSError, match="failed after the S3 retry budget"):
        store.write_bytes("jobs/j/status.parquet", b"x")
    assert len(seen) == policy.pyarrow_attempts() == 7
    seen.clear()
    with pytest.raises(Exception):
        store.write_bytes("subjects/a/features/shard-00000.safetensors", b"x")  # tagged: one boto3 PUT
    assert len(seen) == policy.botocore_attempts() and len(seen) > 1
    worker_fs = pickle.loads(pickle.dumps(store.filesystem))  # what a Ray Train worker gets
    clone = pickle.loads(pickle.dumps(store))
    seen.clear()
    with pytest.raises(OSError):
        clone.read_bytes("metrics.json")
    assert len(seen) == policy.pyarrow_attempts()
    seen.clear()
    local = pafs.LocalFileSystem()
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "lora.safetensors"), "wb").write(b"w")
        take_failed_uploads()
        # pyarrow.fs.copy_files returns success although the upload failed (the file is missing): the handler's
        # streams record it so the trainer can refuse the checkpoint (training.py)
        pafs.copy_files(d, f"{BUCKET}/p/subjects/a/checkpoints/c0", source_filesystem=local,
                        destination_filesystem=worker_fs)
    puts = [s for s in seen if s.startswith("PUT")]
    assert len(puts) == policy.pyarrow_attempts(), seen
    failed = take_failed_uploads()
    assert len(failed) == 1 and "checkpoints/c0/lora.safetensors" in failed[0] and "SERVICE_UNAVAILABLE" in failed[0]


def test_pickles_hold_no_secret(s3_endpoint, aws_env):
    store = Store.open(f"s3://{BUCKET}/{unique_prefix('pk')}", endpoint_url=s3_endpoint)
    store.write_bytes("a", b"1")
    blob = pickle.dumps(store) + pickle.dumps(store.filesystem)
    assert aws_env["AWS_SECRET_ACCESS_KEY"].encode() not in blob and aws_env["AWS_ACCESS_KEY_ID"].encode() not in blob
    assert pickle.loads(pickle.dumps(store)).read_bytes("a") == b"1"


def test_credentials_that_change_during_a_run(s3_endpoint, tmp_path, monkeypatch):
    """credential_process hands out short-lived keys that differ on every call; the store keeps working and
    its pyarrow filesystem follows them (moto accepts any key, the count shows the refreshes)."""
    counter = tmp_path / "calls"
    script = tmp_path / "creds.py"
    script.write_text(
        "import json, datetime, pathlib\n"
        f"p = pathlib.Path({str(counter)!r})\n"
        "n = int(p.read_text()) + 1 if p.exists() else 1\n"
        "p.write_text(str(n))\n"
        "exp = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)\n"
        "print(json.dumps({'Version': 1, 'AccessKeyId': f'rotating-{n}', 'SecretAccessKey': f'secret-{n}',\n"
        "                  'SessionToken': f'token-{n}', 'Expiration': exp.isoformat()}))\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    config = tmp_path / "config"
    config.write_text(f"[profile rotating]\ncredential_process = {sys.executable} {script}\nregion = us-east-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)
    store = Store.open(f"s3://{BUCKET}/{unique_prefix('rot')}", endpoint_url=s3_endpoint, profile="rotating")
    for i in range(4):
        # boto3 refreshes keys that expire within its advisory window (15 min): each call sees new keys
        store.write_json(f"m/{i}.json", {"i": i})
        assert store.read_json(f"m/{i}.json") == {"i": i}
        store.write_bytes(f"subjects/s/features/shard-{i:05d}.safetensors", b"f")  # boto3 path
    assert int(counter.read_text()) >= 4  # the provider chain was asked again, not frozen at open
    assert store._handler.rebuilds >= 4  # and the pyarrow filesystem was rebuilt with the new keys
    assert store.list("m") == [f"m/{i}.json" for i in range(4)]


def test_content_types_and_no_directory_markers(s3_endpoint, s3_client, tmp_path):
    """Issue 15 item 6 (store part): objects carry their content type; nothing writes zero-byte `dir/` markers,
    including Ray Train's way of uploading a checkpoint (create_dir + copy_files) and deletes that empty a prefix."""
    import pyarrow as pa
    prefix = unique_prefix("ct")
    store = Store.open(f"s3://{BUCKET}/{prefix}", endpoint_url=s3_endpoint)
    store.write_bytes("subjects/a/samples/sample_00.png", b"\x89PNG")
    store.write_json("subjects/a/metrics.json", {})
    store.write_table("jobs/j/status.parquet", pa.table({"x": [1]}))
    store.write_bytes("subjects/a/features/shard-00000.safetensors", b"f")  # boto3 (tagged) path
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "lora.safetensors").write_bytes(b"w")
    fs = pickle.loads(pickle.dumps(store.filesystem))
    fs.create_dir(store.fs_path("subjects/a/checkpoints/run/checkpoint_0"), recursive=True)
    pafs.copy_files(str(tmp_path / "ck"), store.fs_path("subjects/a/checkpoints/run/checkpoint_0"),
                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    store.write_bytes("tmp/only.json", b"{}")
    fs.delete_file(store.fs_path("tmp/only.json"))
    keys = [o["Key"][len(prefix) + 1:] for o in s3_client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")["Contents"]]
    assert not [k for k in keys if k.endswith("/")], keys
    types = {k: s3_client.head_object(Bucket=BUCKET, Key=f"{prefix}/{k}")["ContentType"] for k in keys}
    assert types == {
        "subjects/a/samples/sample_00.png": "image/png",
        "subjects/a/metrics.json": "application/json",
        "jobs/j/status.parquet": "application/vnd.apache.parquet",
        "subjects/a/features/shard-00000.safetensors": "application/octet-stream",
        "subjects/a/checkpoints/run/checkpoint_0/lora.safetensors": "application/octet-stream",
    }


def test_long_lived_client_keeps_retrying_after_many_failed_calls(down):
    """botocore's retry quota (500 tokens, 5 per retry) would let a client fail fast after ~100 retries; the
    store's client has none: call 60 still makes every attempt (the drill's second outage failed in 0.0 s)."""
    endpoint, seen = down
    store = Store.open(f"s3://{BUCKET}/q", endpoint_url=endpoint, retry=RetryPolicy(max_attempts=3))
    for i in range(60):  # 60 x 2 retries x 5 tokens = 600 > 500 (short backoffs: 2 retries per call)
        seen.clear()
        with pytest.raises(Exception):
            store.write_bytes(f"subjects/a/features/shard-{i:05d}.safetensors", b"x")
        assert len(seen) == 3, (i, len(seen))

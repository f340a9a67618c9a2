"""Store behaviour, identical on a local directory and an S3 prefix."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pytest

from blockskip_ray.store import Store


def test_bytes_roundtrip_and_overwrite(store):
    store.write_bytes("a/b/c.bin", b"one")
    assert store.read_bytes("a/b/c.bin") == b"one"
    store.write_bytes("a/b/c.bin", b"two!")
    assert store.read_bytes("a/b/c.bin") == b"two!"
    store.write_bytes("empty", b"")
    assert store.read_bytes("empty") == b""


def test_missing_key_names_key(store):
    with pytest.raises(FileNotFoundError, match="nope/missing.bin"):
        store.read_bytes("nope/missing.bin")
    assert not store.exists("nope/missing.bin")


def test_exists_is_for_objects_only(store):
    store.write_bytes("d/x", b"1")
    assert store.exists("d/x")
    assert not store.exists("d")


def test_list(store):
    for k in ["s/a/1", "s/a/2", "s/b/1", "top"]:
        store.write_bytes(k, b"x")
    assert store.list() == ["s/a/1", "s/a/2", "s/b/1", "top"]
    assert store.list("s") == ["s/a/1", "s/a/2", "s/b/1"]
    assert store.list("s/a") == ["s/a/1", "s/a/2"]
    assert store.list("s", recursive=False) == ["s/a/", "s/b/"]
    assert store.list("", recursive=False) == ["s/", "top"]
    assert store.list("nothing-here") == []


def test_delete(store):
    for k in ["p/a/1", "p/a/2", "p/b", "q"]:
        store.write_bytes(k, b"x")
    store.delete_prefix("p/a")
    assert store.list() == ["p/b", "q"]
    store.delete("q")
    store.delete("q")  # idempotent
    assert store.list() == ["p/b"]
    store.delete_prefix("p")
    assert store.list() == []
    with pytest.raises(ValueError):
        store.delete_prefix("")  # never the whole store by accident


def test_json_and_table(store):
    store.write_json("m/meta.json", {"b": [1, 2], "a": "x"})
    assert store.read_json("m/meta.json") == {"a": "x", "b": [1, 2]}
    t = pa.table({"step": [0, 1, 2], "t": [0.1, 0.5, 0.9]})
    store.write_table("m/plan.parquet", t)
    assert store.read_table("m/plan.parquet").equals(t)


def test_upload_download_dir(store, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"A")
    (src / "sub" / "b.bin").write_bytes(b"B" * 1000)
    store.upload_dir(src, "dirs/one")
    assert store.list("dirs") == ["dirs/one/a.txt", "dirs/one/sub/b.bin"]
    out = store.download_dir("dirs/one", tmp_path / "dst")
    assert (out / "a.txt").read_bytes() == b"A"
    assert (out / "sub" / "b.bin").read_bytes() == b"B" * 1000
    with pytest.raises(FileNotFoundError):
        store.download_dir("dirs/none", tmp_path / "dst2")


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/../../b", ""])
def test_bad_keys(store, key):
    with pytest.raises(ValueError):
        store.write_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.read_bytes(key)


def test_url_and_uri(store):
    if store.local_path is not None:
        assert store.url("a/b") == str(store.local_path / "a" / "b")
    else:
        assert store.uri.startswith("s3://")
        assert store.url("a/b") == store.uri + "/a/b"


def test_pickle_roundtrip(store):
    store.write_bytes("p", b"pickled")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.read_bytes("p") == b"pickled"
    clone.delete("p")
    assert not store.exists("p")


def test_local_write_is_atomic_no_temp_left(tmp_path):
    s = Store.open(f"file://{tmp_path}/st")
    s.write_bytes("x/y", b"data")
    assert [p.name for p in (tmp_path / "st" / "x").iterdir()] == ["y"]
    assert s.local_path == (tmp_path / "st").resolve()


def test_unsupported_scheme():
    with pytest.raises(ValueError, match="unsupported"):
        Store.open("gs://bucket/x")


def test_s3_settings_from_env(s3_endpoint, monkeypatch, aws_env):
    """AWS_ENDPOINT_URL alone is enough; secrets never show in repr or errors."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    s = Store.open("s3://blockskip-test/env-test")
    s.write_bytes("k", b"v")
    assert s.read_bytes("k") == b"v"
    assert s.local_path is None
    secret = aws_env["AWS_SECRET_ACCESS_KEY"]
    assert secret not in repr(s)
    with pytest.raises(FileNotFoundError) as ei:
        s.read_bytes("missing")
    assert secret not in str(ei.value)
    s.delete_prefix("k")


def test_missing_bucket_is_not_retried_forever(s3_endpoint):
    s = Store.open("s3://no-such-bucket-x/p", endpoint_url=s3_endpoint, )
    with pytest.raises(OSError):
        s.write_bytes("k", b"v")

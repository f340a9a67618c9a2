"""S3 through a fault-injecting proxy: retries, permanent errors, commit protocol."""

from __future__ import annotations


import pyarrow as pa
import pytest
import torch

from blockskip_ray.store import FeatureReader, FeatureWriter, JobStatus, Store, put_adapter
from blockskip_ray.store.adapters import ADAPTER_FILE
from blockskip_ray.store.features import features_prefix, is_committed

from test_store_features import SID, files, make_steps, write


def faults_seen(proxy, kind=None):
    return [s for s in proxy.seen if s.fault and (kind is None or s.fault == kind)]


@pytest.mark.parametrize("status,code", [(503, "SlowDown"), (500, "InternalError"), (503, "ServiceUnavailable")])
def test_retry_on_5xx(proxied_store, fault_proxy, status, code):
    fault_proxy.inject("status", count=2, status=status, code=code, methods=("PUT",))
    proxied_store.write_bytes("k/v.bin", b"payload")
    fault_proxy.inject("status", count=2, status=status, code=code, methods=("GET", "HEAD"))
    assert proxied_store.read_bytes("k/v.bin") == b"payload"
    assert len(faults_seen(fault_proxy, "status")) == 4 and fault_proxy.pending() == 0


def test_retry_on_dropped_connection(proxied_store, fault_proxy):
    fault_proxy.inject("drop", count=2, methods=("PUT",))
    proxied_store.write_json("j.json", {"a": 1})
    fault_proxy.inject("drop", count=1)
    assert proxied_store.read_json("j.json") == {"a": 1}
    fault_proxy.inject("drop", count=1)
    assert proxied_store.list() == ["j.json"]
    assert len(faults_seen(fault_proxy, "drop")) == 4


def test_retry_on_timeout(proxied_store, fault_proxy):
    proxied_store.write_bytes("slow", b"x")
    fault_proxy.inject("delay", count=1, seconds=2.5, methods=("GET", "HEAD"))  # > request_timeout=1s
    assert proxied_store.read_bytes("slow") == b"x"
    assert len(faults_seen(fault_proxy, "delay")) == 1
    # the slow request was abandoned at request_timeout and retried (no wall-clock assert: load may vary)
    assert len([s for s in fault_proxy.seen if "slow" in s.path]) >= 2


def test_small_delay_just_succeeds(proxied_store, fault_proxy):
    fault_proxy.inject("delay", count=2, seconds=0.2)
    proxied_store.write_bytes("d", b"1")
    assert proxied_store.read_bytes("d") == b"1"


def test_retries_exhausted(proxied_store, fault_proxy):
    fault_proxy.inject("status", count=100, status=503, code="SlowDown", methods=("PUT",))
    with pytest.raises(OSError, match=r"failed after the S3 retry budget \(pyarrow: 5 attempts") as ei:
        proxied_store.write_bytes("never", b"x")
    assert "proxied" in str(ei.value) and "never" in str(ei.value)
    assert len(faults_seen(fault_proxy)) == 5


def test_permanent_errors_not_retried(proxied_store, fault_proxy):
    proxied_store.write_bytes("secret", b"x")
    fault_proxy.clear()
    fault_proxy.inject("status", count=10, status=403, code="AccessDenied")
    with pytest.raises(PermissionError, match="secret"):
        proxied_store.read_bytes("secret")
    assert len(faults_seen(fault_proxy)) == 1  # raised at once
    fault_proxy.clear()
    with pytest.raises(FileNotFoundError, match="missing-key"):
        proxied_store.read_bytes("missing-key")
    assert len(fault_proxy.seen) == 1


def test_feature_set_survives_transient_faults(proxied_store, fault_proxy, tmp_path):
    steps = make_steps(5)
    fault_proxy.inject("status", count=2, status=503, code="SlowDown", methods=("PUT",), path_contains="shard-")
    fault_proxy.inject("drop", count=1, methods=("PUT",), path_contains="index.parquet")
    fault_proxy.inject("status", count=1, status=500, code="InternalError", path_contains="_COMMITTED")
    write(proxied_store, steps, dtype="bf16", shard_max_bytes=3000)
    fault_proxy.inject("status", count=2, status=503, code="SlowDown", methods=("GET",), path_contains="shard-")
    r = FeatureReader(proxied_store, SID)
    for (s, ts), (s2, got) in zip(steps, r.iter_steps()):
        assert s == s2 and torch.equal(got["h"], ts["h"].to(torch.bfloat16).float())
    assert fault_proxy.pending() == 0
    reference = Store.open(str(tmp_path / "ref"))
    write(reference, steps, dtype="bf16", shard_max_bytes=3000)
    assert files(proxied_store) == files(reference)


def test_failure_before_commit_then_rerun(proxied_store, fault_proxy, tmp_path):
    steps = make_steps(5)
    # shard-00001 cannot be written at all: the writer fails mid-set.
    fault_proxy.inject("status", count=100, status=503, code="SlowDown", methods=("PUT",),
                       path_contains="shard-00001")
    with pytest.raises(OSError, match="shard-00001"):
        write(proxied_store, steps, dtype="fp8_e4m3", shard_max_bytes=3000)
    fault_proxy.clear()
    assert proxied_store.exists(f"{features_prefix(SID)}/shard-00000.safetensors")  # partial set exists
    assert not is_committed(proxied_store, SID)
    with pytest.raises(FileNotFoundError, match="not committed"):
        FeatureReader(proxied_store, SID)
    # Rerun with the store healthy: byte-identical to a clean run elsewhere.
    write(proxied_store, steps, dtype="fp8_e4m3", shard_max_bytes=3000)
    reference = Store.open(str(tmp_path / "ref"))
    write(reference, steps, dtype="fp8_e4m3", shard_max_bytes=3000)
    assert files(proxied_store) == files(reference)
    assert FeatureReader(proxied_store, SID).steps == [s for s, _ in steps]


def test_layout_matches_design(s3_endpoint, s3_client, tmp_path):
    """A plain boto3 listing shows exactly the design's section 4 layout."""
    from conftest import BUCKET, unique_prefix

    prefix = unique_prefix("layout")
    st = Store.open(f"s3://{BUCKET}/{prefix}", endpoint_url=s3_endpoint)
    st.write_json("models/tiny-flux/selection.json", {"0.5": [2, 3]})
    st.write_table("subjects/toy-1/plan.parquet", pa.table({"step": [0, 1]}))
    write(st, make_steps(3), dtype="bf16", shard_max_bytes=3000, sid="toy-1")
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / ADAPTER_FILE).write_bytes(b"lora")
    put_adapter(st, "toy-1", ad)
    st.write_json("subjects/toy-1/metrics.json", {"loss": [1.0]})
    js = JobStatus(st, "job-7")
    js.update("toy-1", stage="train", state="succeeded")
    js.compact()  # status events folded into status.parquet (and deleted)
    resp = s3_client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    keys = sorted(o["Key"][len(prefix) + 1:] for o in resp["Contents"])
    n_shards = st.read_json("subjects/toy-1/features/_COMMITTED")["num_shards"]
    assert n_shards >= 2
    assert keys == sorted([
        "models/tiny-flux/selection.json",
        "subjects/toy-1/plan.parquet",
        "subjects/toy-1/features/index.parquet",
        "subjects/toy-1/features/_COMMITTED",
        *[f"subjects/toy-1/features/shard-{i:05d}.safetensors" for i in range(n_shards)],
        f"subjects/toy-1/adapter/{ADAPTER_FILE}",
        "subjects/toy-1/metrics.json",
        "jobs/job-7/status.parquet",
    ])

"""Feature shards: round trips per dtype, integrity, commit protocol, determinism."""

from __future__ import annotations

import hashlib

import pytest
import torch

from blockskip_ray.store import FeatureReader, FeatureWriter, Store, dequantize_fp8, quantize_fp8
from blockskip_ray.store.features import delete_features, features_prefix, is_committed

SID = "toy-1"


def make_steps(n: int = 6, seed: int = 0, tokens: int = 8, dim: int = 32) -> list[tuple[int, dict]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        step = 3 * i + 1
        out.append((step, {
            "h": torch.randn(tokens, dim, generator=g),
            "e": torch.randn(2, 4, dim, generator=g),
            "delta": torch.randn(tokens, dim, generator=g).to(torch.float16),
            "target": torch.randn(tokens, dim, generator=g),
            "t": torch.tensor(0.25 * i),
            "crop": torch.tensor([0, 16, 64, 64], dtype=torch.int64),
        }))
    return out


def write(store: Store, steps, dtype="bf16", shard_max_bytes=4096, sid=SID, extra=None) -> None:
    w = FeatureWriter(store, sid, dtype=dtype, shard_max_bytes=shard_max_bytes)
    for s, ts in steps:
        w.add(s, ts)
    w.commit(extra)


def files(store: Store, sid=SID) -> dict[str, bytes]:
    prefix = features_prefix(sid)
    return {k[len(prefix) + 1:]: store.read_bytes(k) for k in store.list(prefix)}


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8_e4m3"])
def test_roundtrip(store, dtype):
    steps = make_steps()
    write(store, steps, dtype=dtype, extra={"plan": "p1"})
    r = FeatureReader(store, SID)
    assert r.steps == [s for s, _ in steps]
    assert r.meta["extra"] == {"plan": "p1"} and r.meta["dtype"] == dtype
    assert r.meta["num_shards"] > 1  # 4 KiB cap forces several shards
    for s, ts in steps:
        got = r.get(s)
        assert set(got) == set(ts)
        for k, v in ts.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got["crop"], ts["crop"])  # ints are stored as is
        assert torch.equal(got["t"], ts["t"])        # 0-d floats: exact except bf16 cast
        if dtype == "fp32":
            for k, v in ts.items():
                assert torch.equal(got[k], v)
        elif dtype == "bf16":
            assert torch.equal(got["h"], ts["h"].to(torch.bfloat16).float())
        else:
            rel = (got["h"] - ts["h"]).abs().max() / ts["h"].abs().max()
            assert rel < 0.07


def test_bf16_exact_for_representable(store):
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).float()
    write(store, [(0, {"h": x})], dtype="bf16")
    assert torch.equal(FeatureReader(store, SID).get(0)["h"], x)


def test_fp8_quantization_error_bounded():
    g = torch.Generator().manual_seed(2)
    # "Normal" values: within 1/16 of the row max, so every scaled value is a
    # normal (not subnormal) e4m3 number; e4m3 keeps 3 mantissa bits, i.e. a
    # relative rounding error of at most 2**-4 = 6.25%.
    mag = torch.rand(32, 128, generator=g) * (1 - 1 / 16) + 1 / 16
    sign = torch.where(torch.rand(32, 128, generator=g) < 0.5, -1.0, 1.0)
    x = mag * sign * (10 ** torch.linspace(-3, 3, 32)).unsqueeze(1)  # very different row scales
    q, scale = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (32, 1) and scale.dtype == torch.float32
    y = dequantize_fp8(q, scale, torch.float32)
    rel = ((y - x).abs() / x.abs()).max().item()
    assert rel < 0.07
    # zero rows must not produce NaN
    q0, s0 = quantize_fp8(torch.zeros(2, 8))
    assert torch.equal(dequantize_fp8(q0, s0), torch.zeros(2, 8))


def test_fp8_small_tensors_stay_fp32(store):
    write(store, [(0, {"t": torch.tensor(0.123456789), "v": torch.tensor([1e-7, 3.14159265])})],
          dtype="fp8_e4m3")
    r = FeatureReader(store, SID)
    got = r.get(0)
    assert torch.equal(got["t"], torch.tensor(0.123456789))
    assert torch.equal(got["v"], torch.tensor([1e-7, 3.14159265]))


def test_step_order_enforced(store):
    w = FeatureWriter(store, SID)
    w.add(5, {"h": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="increasing"):
        w.add(5, {"h": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="increasing"):
        w.add(4, {"h": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="tensor name"):
        w.add(6, {"a/b": torch.zeros(1)})
    with pytest.raises(ValueError, match="dtype"):
        FeatureWriter(store, SID, dtype="fp16")


def test_uncommitted_is_not_readable(store):
    w = FeatureWriter(store, SID, shard_max_bytes=1024)
    for s, ts in make_steps(4):
        w.add(s, ts)
    assert store.list(features_prefix(SID))  # shards were written ...
    assert not is_committed(store, SID)
    with pytest.raises(FileNotFoundError, match="not committed"):
        FeatureReader(store, SID)  # ... but are never read without _COMMITTED
    w.commit()
    assert is_committed(store, SID)
    with pytest.raises(RuntimeError):
        w.add(100, {"h": torch.zeros(1)})


def test_expired_shard_makes_the_set_absent(store):
    """A lifecycle rule may expire a shard before the marker: the set then counts as not committed."""
    write(store, make_steps(4), shard_max_bytes=1024)
    shards = [k for k in store.list(features_prefix(SID)) if k.endswith(".safetensors")]
    assert len(shards) >= 2 and is_committed(store, SID)
    store.delete(shards[1])
    assert not is_committed(store, SID)
    write(store, make_steps(4), shard_max_bytes=1024)  # a rerun rewrites it
    assert is_committed(store, SID)


def test_missing_commit_marker(store):
    write(store, make_steps(2))
    store.delete(f"{features_prefix(SID)}/_COMMITTED")
    with pytest.raises(FileNotFoundError, match="not committed"):
        FeatureReader(store, SID)


def test_checksum_mismatch_names_shard_and_step(store):
    steps = make_steps(4)
    write(store, steps, dtype="fp32", shard_max_bytes=4096)
    r = FeatureReader(store, SID)
    victim_step = steps[-1][0]
    shard = r.shard_of(victim_step)
    row = next(x for x in r._rows[victim_step] if x["key"] == "h")
    key = f"{features_prefix(SID)}/{shard}"
    data = bytearray(store.read_bytes(key))
    data[row["offset"] + 5] ^= 0x01  # flip one bit inside the tensor data
    store.write_bytes(key, bytes(data))
    fresh = FeatureReader(store, SID)
    with pytest.raises(ValueError, match=rf"{shard}.*step {victim_step}"):
        fresh.get(victim_step)
    with pytest.raises(ValueError, match=shard):
        list(FeatureReader(store, SID).iter_steps())  # surfaces through the prefetch thread


def test_iter_steps(store):
    steps = make_steps(6)
    write(store, steps, dtype="fp32", shard_max_bytes=3000)
    r = FeatureReader(store, SID)
    assert r.meta["num_shards"] >= 3
    got = [(s, ts["h"]) for s, ts in r.iter_steps(prefetch=1)]
    assert [s for s, _ in got] == r.steps
    for (s, h), (s2, ts) in zip(got, steps):
        assert s == s2 and torch.equal(h, ts["h"])
    order = [r.steps[4], r.steps[0], r.steps[5]]
    assert [s for s, _ in r.iter_steps(order)] == order
    it = r.iter_steps()
    next(it)
    it.close()  # early stop ends the prefetch thread
    with pytest.raises(KeyError):
        list(r.iter_steps([99999]))


def test_reader_returns_copies(store):
    write(store, make_steps(1), dtype="fp32")
    r = FeatureReader(store, SID)
    s = r.steps[0]
    r.get(s)["h"].zero_()
    assert r.get(s)["h"].abs().sum() > 0


def test_deterministic_bytes_and_rewrite(store, tmp_path):
    """Two writers on the same input give identical bytes, here and on another backend."""
    steps = make_steps(5)
    write(store, steps, dtype="fp8_e4m3", shard_max_bytes=3000)
    first = files(store)
    write(store, steps, dtype="fp8_e4m3", shard_max_bytes=3000)
    assert files(store) == first
    other = Store.open(str(tmp_path / "other"))
    write(other, steps, dtype="fp8_e4m3", shard_max_bytes=3000)
    assert files(other) == first
    # A smaller rewrite removes the stale shards of the old set.
    write(store, steps[:1], dtype="fp8_e4m3", shard_max_bytes=3000)
    assert sorted(files(store)) == ["_COMMITTED", "index.parquet", "shard-00000.safetensors"]
    meta = store.read_json(f"{features_prefix(SID)}/_COMMITTED")
    assert meta["index_sha256"] == hashlib.sha256(files(store)["index.parquet"]).hexdigest()
    delete_features(store, SID)
    assert store.list(features_prefix(SID)) == []


def test_index_columns(store):
    write(store, make_steps(2), dtype="fp8_e4m3")
    t = store.read_table(f"{features_prefix(SID)}/index.parquet")
    assert t.column_names[:7] == ["step", "shard", "key", "dtype", "orig_dtype", "shape", "sha256"]
    rows = t.to_pylist()
    h = next(r for r in rows if r["key"] == "h")
    assert h["dtype"] == "float8_e4m3fn" and h["orig_dtype"] == "float32" and h["shape"] == [8, 32]
    assert h["scale_sha256"] is not None
    crop = next(r for r in rows if r["key"] == "crop")
    assert crop["dtype"] == "int64" and crop["scale_sha256"] is None


def test_small_float_tensors_kept_fp32_in_bf16_mode(store):
    t = torch.tensor(0.337)
    write(store, [(0, {"t": t, "h": torch.ones(2, 2)})], dtype="bf16")
    rows = {r["key"]: r for r in store.read_table(f"{features_prefix(SID)}/index.parquet").to_pylist()}
    assert rows["t"]["dtype"] == "float32" and rows["h"]["dtype"] == "bfloat16"
    assert torch.equal(FeatureReader(store, SID).get(0)["t"], t)


def test_feature_objects_carry_the_lifecycle_tag(s3_endpoint, s3_client):
    """infra/terraform expires feature objects by prefix subjects/ AND tag blockskip-kind=features: every object
    under features/ must carry the tag (checked with plain boto3), nothing else may."""
    BUCKET, prefix = "tags-test", "p"
    s3_client.create_bucket(Bucket=BUCKET)
    store = Store.open(f"s3://{BUCKET}/{prefix}", endpoint_url=s3_endpoint, )
    write(store, make_steps(3))
    store.write_json(f"subjects/{SID}/metrics.json", {"x": 1})
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")["Contents"]]
    tags = {k.removeprefix(prefix + "/"): {t["Key"]: t["Value"] for t in
                                           s3_client.get_object_tagging(Bucket=BUCKET, Key=k)["TagSet"]}
            for k in keys}
    feature_keys = [k for k in tags if k.startswith(f"subjects/{SID}/features/")]
    assert len(feature_keys) >= 3 and f"subjects/{SID}/features/_COMMITTED" in feature_keys
    assert all(tags[k] == {"blockskip-kind": "features"} for k in feature_keys), tags
    assert tags[f"subjects/{SID}/metrics.json"] == {}

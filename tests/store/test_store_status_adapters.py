"""Job status table and adapter helpers, on both backends."""

from __future__ import annotations

import datetime as dt

import pytest

from blockskip_ray.store import ADAPTER_FILE, JobStatus, fetch_adapter, list_adapters, put_adapter
from blockskip_ray.store.status import COLUMNS


def test_status_upsert_and_format(store):
    js = JobStatus(store, "job-1")
    assert js.read() == []
    assert "no status" in js.format_table()
    js.set_many([{"subject_id": s, "stage": "plan"} for s in ["toy-2", "toy-1"]])
    js.update("toy-1", stage="precompute", state="running", attempts=1,
              started_at=dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc))
    js.update("toy-2", state="failed", error="CUDA out of memory\nat step 3", attempts=2)
    rows = js.read()
    assert [r["subject_id"] for r in rows] == ["toy-1", "toy-2"]
    assert rows[0] == {"job_id": "job-1", "subject_id": "toy-1", "stage": "precompute", "state": "running",
                       "error": None, "attempts": 1,
                       "started_at": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc), "finished_at": None}
    assert rows[1]["stage"] == "plan" and rows[1]["state"] == "failed"
    js.compact()
    table = store.read_table("jobs/job-1/status.parquet")
    assert tuple(table.column_names) == COLUMNS
    assert str(table.schema.field("started_at").type) == "timestamp[us, tz=UTC]"
    text = js.format_table()
    assert "2 subjects" in text and "1 running" in text and "1 failed" in text
    assert "CUDA out of memory at step 3" in text and "2026-01-02 03:04:05" in text
    for c in COLUMNS[1:]:
        assert c in text


def test_set_many_keeps_the_fields_a_row_omits(store):
    js = JobStatus(store, "job-3")
    js.update("toy-1", stage="train", state="failed", error="boom", attempts=2, started_at=0)
    js.set_many([{"subject_id": "toy-1", "state": "running", "error": None}, {"subject_id": "toy-2"}])
    a, b = js.read()
    assert (a["stage"], a["state"], a["error"], a["attempts"], a["started_at"]) == \
        ("train", "running", None, 2, dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc))
    assert (b["state"], b["attempts"]) == ("pending", 0)
    with pytest.raises(ValueError, match="state"):
        js.set_many([{"subject_id": "toy-2", "state": "running"}, {"subject_id": "toy-1", "state": "exploded"}])
    assert js.read() == [a, b]  # a bad row writes nothing


def test_status_validation(store):
    js = JobStatus(store, "job-2")
    with pytest.raises(ValueError, match="state"):
        js.update("toy-1", state="exploded")
    with pytest.raises(ValueError, match="unknown status columns"):
        js.update("toy-1", colour="red")
    with pytest.raises(ValueError, match="invalid subject id"):
        js.update("../etc", state="pending")
    with pytest.raises(ValueError, match="invalid job id"):
        JobStatus(store, "a/b")


def _adapter_dir(tmp_path, payload: bytes):
    d = tmp_path / f"adapter-{len(payload)}"
    d.mkdir()
    (d / ADAPTER_FILE).write_bytes(payload)
    (d / "adapter_config.json").write_text('{"r": 4}')
    return d


def test_adapters(store, tmp_path):
    assert list_adapters(store) == []
    put_adapter(store, "dog-2", _adapter_dir(tmp_path, b"w" * 10))
    put_adapter(store, "cat-1", _adapter_dir(tmp_path, b"w" * 20))
    store.write_bytes("subjects/no-adapter/plan.parquet", b"x")  # subject without adapter
    assert list_adapters(store) == ["cat-1", "dog-2"]
    out = fetch_adapter(store, "cat-1", tmp_path / "cache")
    assert out == tmp_path / "cache" / "cat-1"
    assert (out / ADAPTER_FILE).read_bytes() == b"w" * 20
    assert (out / "adapter_config.json").exists()
    # refetch after an update replaces the cached copy
    put_adapter(store, "cat-1", _adapter_dir(tmp_path, b"v" * 30))
    assert (fetch_adapter(store, "cat-1", tmp_path / "cache") / ADAPTER_FILE).read_bytes() == b"v" * 30
    with pytest.raises(KeyError, match="unknown adapter"):
        fetch_adapter(store, "no-adapter", tmp_path / "cache")
    with pytest.raises(ValueError):
        fetch_adapter(store, "../cat-1", tmp_path / "cache")
    with pytest.raises(FileNotFoundError):
        put_adapter(store, "x", tmp_path / "does-not-exist")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]

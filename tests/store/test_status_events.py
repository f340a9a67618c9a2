"""Status bookkeeping at catalog scale: a change costs a constant number of store requests, readers stay
consistent across compactions, and status.parquet keeps the columns (job_id, real timestamps)."""
from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from blockskip_ray.store import JobStatus
from blockskip_ray.store.status import utc_now


def _changes(js: JobStatus, n: int, subjects: int) -> None:
    for i in range(n):
        js.update(f"s-{i % subjects:05d}", stage="train", state="running", attempts=1, started_at=utc_now())


@pytest.mark.parametrize("subjects", [10, 400])
def test_requests_per_change_do_not_grow_with_the_catalog(proxied_store, fault_proxy, subjects):
    js = JobStatus(proxied_store, "big", compact_every=50)
    js.set_many([{"subject_id": f"s-{i:05d}"} for i in range(subjects)])
    js.compact()
    fault_proxy.clear()
    _changes(js, 100, subjects)  # two compactions fall in these 100 changes
    seen = list(fault_proxy.seen)
    per_change = len(seen) / 100
    methods = sorted({s.method for s in seen})
    print(subjects, per_change, methods)
    # one PUT per change + (table PUT + LIST + one batched DELETE) per 50 changes, whatever the catalog's size
    assert per_change <= 1.1, per_change
    # the writer never reads the table or an event back (its GETs are the compactions' LISTs)
    assert not [s.path for s in seen if s.method in ("GET", "HEAD") and ("status.parquet" in s.path or ".json" in s.path)]


def test_reader_sees_pending_events_and_the_compacted_table(store):
    w = JobStatus(store, "j1", compact_every=1000)
    w.set_many([{"subject_id": s} for s in ("a", "b", "c")])
    w.update("b", state="failed", error="boom", finished_at=dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.timezone.utc))
    assert not store.exists("jobs/j1/status.parquet")  # nothing compacted yet: readers fold in the events
    r = JobStatus(store, "j1")
    assert r.read() == w.read()
    assert r.counts() == {"pending": 2, "running": 0, "succeeded": 0, "failed": 1, "skipped": 0}
    assert r.get("b")["finished_at"] == dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
    w.compact()
    assert store.list("jobs/j1/status-events") == []
    table = store.read_table("jobs/j1/status.parquet")
    assert table.schema.metadata[b"events_through"] == b"1"
    assert table.column("job_id").to_pylist() == ["j1"] * 3
    assert pa.types.is_timestamp(table.schema.field("finished_at").type)
    assert JobStatus(store, "j1").read() == w.read()


def test_auto_compaction_and_a_second_writer_continue_the_sequence(store):
    w = JobStatus(store, "j2", compact_every=3)
    for i in range(7):
        w.update(f"s{i}", state="running")
    assert len(store.list("jobs/j2/status-events")) == 1  # 6 folded into the table by two compactions
    w2 = JobStatus(store, "j2", compact_every=3)  # a rerun's driver
    w2.update("s0", state="succeeded")
    assert [k.rsplit("/", 1)[-1] for k in store.list("jobs/j2/status-events")] == ["000000000006.json",
                                                                                   "000000000007.json"]
    assert JobStatus(store, "j2").get("s0")["state"] == "succeeded"
    assert JobStatus(store, "j2").counts()["running"] == 6


def test_reader_retries_when_a_compaction_runs_between_its_reads(store, monkeypatch):
    w = JobStatus(store, "j3", compact_every=1000)
    for sid in ("a", "b", "c"):
        w.update(sid, state="running")
    r = JobStatus(store, "j3")
    real_list, calls = store.list, []

    def list_after_compaction(prefix="", recursive=True):
        if not calls:  # the table the reader just read is now stale and the events it needs are gone
            w.update("a", state="succeeded")
            w.compact()
        calls.append(prefix)
        return real_list(prefix, recursive)

    monkeypatch.setattr(store, "list", list_after_compaction)
    assert r.read() == w.read()
    assert len(calls) == 2 and r.get("a")["state"] == "succeeded"


def test_tables_written_before_job_id_and_timestamps_still_read(store):
    old = pa.table({"subject_id": ["a"], "stage": ["done"], "state": ["succeeded"], "error": [None],
                    "attempts": [1], "started_at": ["2026-01-02T03:04:05+00:00"], "finished_at": [None]})
    store.write_table("jobs/old/status.parquet", old)
    (row,) = JobStatus(store, "old").read()
    assert row["job_id"] == "old" and row["started_at"] == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    with pytest.raises(ValueError, match="invalid timestamp"):
        JobStatus(store, "old").update("a", started_at="yesterday")
    with pytest.raises(ValueError, match="of job 'x' given to job 'old'"):
        JobStatus(store, "old").set_many([{"subject_id": "a", "job_id": "x"}])


def test_every_jobs_status_in_one_pyarrow_query(tmp_path):
    """The query docs/jobs.md gives: every job's subjects and states from the compacted tables."""
    import pyarrow.dataset as ds

    from blockskip_ray.store import Store
    store = Store.open(str(tmp_path / "store"))
    for job, subjects in (("j-a", ["s1", "s2"]), ("j-b", ["s1"])):
        js = JobStatus(store, job)
        js.set_many([{"subject_id": s, "state": "succeeded", "finished_at": utc_now()} for s in subjects])
        js.compact()
    JobStatus(store, "j-c").update("s9", state="running")  # not compacted yet: only `blockskip status` sees it
    table = ds.dataset(str(tmp_path / "store" / "jobs"), format="parquet",
                       exclude_invalid_files=True).to_table(columns=["job_id", "subject_id", "state", "finished_at"])
    rows = sorted((r["job_id"], r["subject_id"], r["state"]) for r in table.to_pylist())
    assert rows == [("j-a", "s1", "succeeded"), ("j-a", "s2", "succeeded"), ("j-b", "s1", "succeeded")]


class _Gate:
    """Wraps a store: write_bytes of status events blocks until released, or fails while `fail` is set."""

    def __init__(self, store) -> None:
        import threading
        self.store, self.open, self.fail, self.events = store, threading.Event(), False, 0
        self.open.set()

    def __getattr__(self, name):
        return getattr(self.store, name)

    def write_bytes(self, key, data):
        if "/status-events/" in key:
            self.open.wait(10)
            if self.fail:
                raise OSError("injected: store unreachable")
            self.events += 1
        return self.store.write_bytes(key, data)


def test_write_behind_coalesces_a_burst_and_readers_see_every_change_after_flush(store):
    gate = _Gate(store)
    w = JobStatus(gate, "wb", compact_every=1000, write_behind=True)
    gate.open.clear()  # the first PUT blocks: every change made meanwhile goes into the next event
    for i in range(50):
        w.update(f"s{i:02d}", state="running", attempts=1)
    for i in range(50):
        w.update(f"s{i:02d}", state="succeeded")
    assert w.counts()["succeeded"] == 50  # the writer's own view is immediate
    gate.open.set()
    w.flush()
    assert 1 <= gate.events <= 2, gate.events  # 100 changes, at most one PUT in flight + one for the rest
    r = JobStatus(store, "wb").read()
    assert len(r) == 50 and {x["state"] for x in r} == {"succeeded"} and r == w.read()
    w.compact()
    assert store.list("jobs/wb/status-events") == [] and JobStatus(store, "wb").read() == w.read()


def test_write_behind_failure_reaches_the_next_caller_and_nothing_is_lost(store):
    gate = _Gate(store)
    w = JobStatus(gate, "wf", compact_every=1000, write_behind=True)
    gate.fail = True
    w.update("a", state="running")
    with pytest.raises(OSError, match="status of job wf: writing a status event failed .*unreachable"):
        w.flush()
    gate.fail = False
    w.update("b", state="failed", error="bad data")  # starts the writer again: a's change is still pending
    w.compact()
    got = {x["subject_id"]: x["state"] for x in JobStatus(store, "wf").read()}
    assert got == {"a": "running", "b": "failed"}


def test_write_behind_with_concurrent_writers_and_compactions_stays_consistent(store):
    from concurrent.futures import ThreadPoolExecutor
    w = JobStatus(store, "wc", compact_every=3, write_behind=True)

    def subject(i: int) -> None:
        for state in ("running", "succeeded"):
            w.update(f"s{i:02d}", state=state, attempts=1)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(subject, range(24)))
    w.compact()
    assert JobStatus(store, "wc").read() == w.read()
    assert w.counts()["succeeded"] == 24 and store.list("jobs/wc/status-events") == []

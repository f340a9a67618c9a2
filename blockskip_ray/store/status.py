"""Job status table: ``jobs/{job_id}/status.parquet`` plus pending change events, one row per subject.

Columns (design section 5): job_id, subject_id, stage, state, error, attempts, started_at, finished_at.
Timestamps are Parquet timestamps (microseconds, UTC), so DuckDB and pyarrow compare and sort them as times.

Cost per state change (catalogs of 10,000 subjects): the driver (the single writer: Ray workers report to
it) keeps the table in memory and writes each change as one small event object,
``jobs/{job_id}/status-events/{seq:012d}.json`` (the changed rows, whole). Every `compact_every` events and
at the end of a job (`compact`) it rewrites ``status.parquet`` with every row, records in its schema
metadata the last event folded in (``events_through``), then deletes those events (one LIST and one batched
DeleteObjects per 1000). A change thus costs one PUT, plus about 3 / compact_every: constant in the number
of subjects, where rewriting the table on every change was O(N) per change and O(N^2) per job.
A reader (``blockskip status``, another process) reads the table, then the events after its
``events_through``; when a compaction ran in between (an event it needs is gone), it reads again.

The job driver writes behind (``write_behind=True``): a change updates the in-memory table at once and a
background thread PUTs the changes made since its last PUT as one event, so a change never waits for the
store and a burst of changes costs one request (at most one per change). `flush`/`compact` wait for the
writes; a write that fails (after the store's retry budget) is raised to the next caller and retried.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import threading
from typing import Any, Iterable

import pyarrow as pa

from .ids import validate_id
from .uri import Store

__all__ = ["JobStatus", "STATES", "STATUS_SCHEMA", "status_key", "utc_now", "jsonable"]

STATES = ("pending", "running", "succeeded", "failed", "skipped")
COLUMNS = ("job_id", "subject_id", "stage", "state", "error", "attempts", "started_at", "finished_at")
_TS = pa.timestamp("us", tz="UTC")
STATUS_SCHEMA = pa.schema([
    ("job_id", pa.string()),
    ("subject_id", pa.string()),
    ("stage", pa.string()),
    ("state", pa.string()),
    ("error", pa.string()),
    ("attempts", pa.int64()),
    ("started_at", _TS),
    ("finished_at", _TS),
])
_DEFAULTS: dict[str, Any] = {"stage": "", "state": "pending", "error": None, "attempts": 0,
                             "started_at": None, "finished_at": None}
_EVENT = re.compile(r"^(\d{12})\.json$")
_THROUGH = b"events_through"


def status_key(job_id: str) -> str:
    return f"jobs/{validate_id(job_id, kind='job id')}/status.parquet"


def events_prefix(job_id: str) -> str:
    return f"jobs/{validate_id(job_id, kind='job id')}/status-events"


def utc_now() -> _dt.datetime:
    """The current time, UTC, timezone-aware (what started_at/finished_at hold)."""
    return _dt.datetime.now(_dt.timezone.utc)


def _norm_time(v: Any) -> _dt.datetime | None:
    if v is None:
        return None
    if isinstance(v, str):
        try:
            v = _dt.datetime.fromisoformat(v)
        except ValueError:
            raise ValueError(f"invalid timestamp {v!r}: expected ISO-8601") from None
    if isinstance(v, bool) or not isinstance(v, (_dt.datetime, int, float)):
        raise ValueError(f"invalid timestamp {v!r}: expected a datetime, ISO-8601 string or epoch seconds")
    if isinstance(v, (int, float)):  # epoch seconds
        v = _dt.datetime.fromtimestamp(v, _dt.timezone.utc)
    if v.tzinfo is None:
        v = v.replace(tzinfo=_dt.timezone.utc)
    return v.astimezone(_dt.timezone.utc)


def _norm_row(row: dict[str, Any], job_id: str) -> dict[str, Any]:
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown status columns: {sorted(unknown)} (allowed: {COLUMNS})")
    if row.get("job_id", job_id) != job_id:
        raise ValueError(f"status row of job {row['job_id']!r} given to job {job_id!r}")
    out = {**_DEFAULTS, **row, "job_id": job_id}
    out["subject_id"] = validate_id(out["subject_id"])
    if out["state"] not in STATES:
        raise ValueError(f"invalid state {out['state']!r}: one of {STATES}")
    out["stage"] = str(out["stage"])
    out["error"] = None if out["error"] is None else str(out["error"])
    out["attempts"] = int(out["attempts"])
    out["started_at"] = _norm_time(out["started_at"])
    out["finished_at"] = _norm_time(out["finished_at"])
    return {c: out[c] for c in COLUMNS}


def jsonable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with timestamps as ISO-8601 strings (for `blockskip status --json` and the event objects)."""
    return [{k: v.isoformat() if isinstance(v, _dt.datetime) else v for k, v in r.items()} for r in rows]


class JobStatus:
    """Read and upsert the status rows of one job (driver = single writer)."""

    def __init__(self, store: Store, job_id: str, compact_every: int = 1000, write_behind: bool = False) -> None:
        if compact_every < 1:
            raise ValueError(f"compact_every must be >= 1, got {compact_every}")
        self.job_id = validate_id(job_id, kind="job id")
        self.store = store
        self.key = status_key(job_id)
        self.events = events_prefix(job_id)
        self.compact_every = compact_every
        self._lock = threading.Lock()  # threads inside the driver process
        self._rows: dict[str, dict[str, Any]] | None = None  # the writer's copy, loaded on its first write
        self._seq = -1  # last event written or folded in
        self._unfolded: list[str] = []  # event keys not yet folded into status.parquet
        self._counts: dict[str, int] | None = None  # the writer's subjects per state
        self.write_behind = write_behind
        self._pending: dict[str, dict[str, Any]] = {}  # write-behind: changed rows not yet in an event
        self._writing = False  # write-behind: the flusher is PUTting an event (lock released meanwhile)
        self._error: BaseException | None = None  # write-behind: the last failed write, for the next caller
        self._flusher: threading.Thread | None = None
        self._done = threading.Condition(self._lock)

    # ------------------------------------------------------------------ reading
    def _load(self) -> tuple[dict[str, dict[str, Any]], int, list[str]]:
        """(rows, last event seq, keys of the events not in the table) from the store, consistently."""
        for _ in range(10):
            rows, through = self._table()
            keys = []
            for k in self.store.list(self.events):
                m = _EVENT.match(k.rsplit("/", 1)[-1])
                if m and int(m.group(1)) > through:
                    keys.append((int(m.group(1)), k))
            keys.sort()
            if keys and keys[0][0] != through + 1:
                continue  # compacted between our two reads: the events we need are in a newer table
            try:
                for _, k in keys:
                    for r in self.store.read_json(k)["rows"]:
                        rows[r["subject_id"]] = _norm_row(r, self.job_id)
            except FileNotFoundError:
                continue  # deleted by a compaction while we read
            if not keys and self._table(through_only=True)[1] != through:
                continue  # a compaction folded (and deleted) events we never listed
            return rows, keys[-1][0] if keys else through, [k for _, k in keys]
        raise OSError(f"status of job {self.job_id} kept changing under the reader (10 tries)")

    def _table(self, through_only: bool = False) -> tuple[dict[str, dict[str, Any]], int]:
        try:
            table = self.store.read_table(self.key)
        except FileNotFoundError:
            return {}, -1
        through = int((table.schema.metadata or {}).get(_THROUGH, b"-1"))
        if through_only:
            return {}, through
        return {r["subject_id"]: _norm_row(r, self.job_id) for r in _upgrade(table).to_pylist()}, through

    def read(self) -> list[dict[str, Any]]:
        """All rows sorted by subject_id; [] when the job has no status yet. The writer answers from memory."""
        with self._lock:
            rows = self._rows if self._rows is not None else self._load()[0]
            return sorted((dict(r) for r in rows.values()), key=lambda r: r["subject_id"])

    def get(self, subject_id: str) -> dict[str, Any] | None:
        """One subject's row (None when it has none); the writer answers from memory."""
        with self._lock:
            rows = self._rows if self._rows is not None else self._load()[0]
            return dict(rows[subject_id]) if subject_id in rows else None

    def counts(self) -> dict[str, int]:
        """Subjects per state (every state, zeros included); the writer keeps them as it goes (O(1))."""
        with self._lock:
            if self._counts is not None:
                return dict(self._counts)
        out = dict.fromkeys(STATES, 0)
        for r in self.read():
            out[r["state"]] += 1
        return out

    # ------------------------------------------------------------------ writing
    def set_many(self, rows: Iterable[dict[str, Any]]) -> None:
        """Upsert several rows at once (one event); each needs a subject_id. Like `update`, the fields a
        row leaves out keep their old values (defaults only for a new subject)."""
        self._upsert(rows)

    def update(self, subject_id: str, **fields: Any) -> dict[str, Any]:
        """Upsert one subject's row: unspecified fields keep their old values."""
        return dict(self._upsert([{**fields, "subject_id": subject_id}])[subject_id])

    def _upsert(self, rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        rows = list(rows)
        for r in rows:
            if "subject_id" not in r:
                raise ValueError(f"status row without subject_id: {r!r}")
            validate_id(r["subject_id"])
        with self._lock:
            self._raise_failed_write()
            self._writer()
            changed = {}
            for r in rows:  # validate everything before writing anything
                sid = r["subject_id"]
                changed[sid] = _norm_row({**changed.get(sid, self._rows.get(sid, {})), **r}, self.job_id)
            if not changed:
                return self._rows
            if self.write_behind:
                self._pending.update(changed)
                self._start_flusher()
            else:
                self._record(self._put_event(changed))
            for sid, row in changed.items():
                if sid in self._rows:
                    self._counts[self._rows[sid]["state"]] -= 1
                self._counts[row["state"]] += 1
            self._rows.update(changed)
            if not self.write_behind and len(self._unfolded) >= self.compact_every:
                self._compact()
            return self._rows

    def _put_event(self, changed: dict[str, dict[str, Any]]) -> str:
        """PUT the next event (I/O only: the writer's sequence moves in `_record`, once it is stored)."""
        key = f"{self.events}/{self._seq + 1:012d}.json"
        self.store.write_bytes(key, json.dumps({"rows": jsonable(list(changed.values()))}).encode())
        return key

    def _record(self, key: str) -> None:
        self._seq += 1
        self._unfolded.append(key)

    # ------------------------------------------------------------------ write-behind
    def _raise_failed_write(self) -> None:
        if self._error is not None:  # the changes stay pending: the next call starts the flusher again
            e, self._error = self._error, None
            raise OSError(f"status of job {self.job_id}: writing a status event failed ({type(e).__name__}: "
                          f"{e}); the changes are kept and written with the next one") from e

    def _start_flusher(self) -> None:
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(target=self._flush_loop, name=f"status-{self.job_id}", daemon=True)
            self._flusher.start()
        self._done.notify_all()

    def _flush_loop(self) -> None:
        with self._lock:
            while self._pending:
                batch, self._pending, self._writing = self._pending, {}, True
                self._lock.release()  # callers go on changing rows (into _pending) while this PUT runs
                try:
                    key = self._put_event(batch)  # only this thread moves _seq in write-behind mode
                    failed = None
                except BaseException as e:  # noqa: BLE001 - handed to the next caller
                    failed = e
                finally:
                    self._lock.acquire()
                    self._writing = False
                    self._done.notify_all()
                if failed is not None:
                    self._pending = {**batch, **self._pending}  # newer changes win
                    self._error = failed
                    break
                self._record(key)
                if len(self._unfolded) >= self.compact_every:
                    try:
                        self._compact()
                    except Exception as e:  # noqa: BLE001 - the events are written; compaction is retried
                        self._error = e
                        break
            self._done.notify_all()

    def flush(self) -> None:
        """Wait until every change is in the store (write-behind); raise the write that failed, if one did."""
        with self._lock:
            while (self._pending or self._writing) and self._error is None:
                if not self._writing and (self._flusher is None or not self._flusher.is_alive()):
                    self._start_flusher()
                self._done.wait(timeout=1.0)
            self._raise_failed_write()

    def compact(self) -> None:
        """Fold the pending events into status.parquet and delete them (the job's end calls this)."""
        self.flush()
        with self._lock:
            while self._writing:  # an event in flight must not land after the table's events_through
                self._done.wait()
            self._writer()
            if self._unfolded or not self.store.exists(self.key):
                self._compact()

    def _writer(self) -> None:
        """Become the writer: load the table and pending events once, then work from memory."""
        if self._rows is None:
            self._rows, self._seq, self._unfolded = self._load()
            self._counts = dict.fromkeys(STATES, 0)
            for r in self._rows.values():
                self._counts[r["state"]] += 1

    def _compact(self) -> None:
        ordered = sorted(self._rows.values(), key=lambda r: r["subject_id"])
        schema = STATUS_SCHEMA.with_metadata({_THROUGH: str(self._seq).encode()})
        self.store.write_table(self.key, pa.Table.from_pylist(ordered, schema=schema))
        # After the table, so a reader never misses a change. One writer: every event under the prefix is
        # folded in, so one batched prefix delete (S3: a LIST + a DeleteObjects per 1000 keys) removes them.
        self.store.delete_prefix(self.events)
        self._unfolded = []

    # ------------------------------------------------------------------ display
    def format_table(self) -> str:
        """A fixed-width text table for ``blockskip status``."""
        rows = self.read()
        if not rows:
            return f"job {self.job_id}: no status recorded"
        headers = [c for c in COLUMNS if c != "job_id"]
        cells = [[("" if r[c] is None else _fmt(r[c])).replace("\n", " ")[:80] for c in headers] for r in rows]
        widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
        line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
        counts = dict.fromkeys(STATES, 0)
        for r in rows:
            counts[r["state"]] += 1
        summary = ", ".join(f"{counts[s]} {s}" for s in STATES if counts[s])
        out = [f"job {self.job_id}: {len(rows)} subjects ({summary})", line(headers),
               line(["-" * w for w in widths])]
        out += [line(c) for c in cells]
        return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, _dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")
    return str(v)


def _upgrade(table: pa.Table) -> pa.Table:
    """Tables written before job_id and timestamp columns: ISO strings parsed by _norm_row, job_id added."""
    if "job_id" not in table.column_names:
        table = table.drop_columns([c for c in table.column_names if c not in COLUMNS])
    return table

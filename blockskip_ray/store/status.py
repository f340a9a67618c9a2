"""Job status table: ``jobs/{job_id}/status.parquet``, one row per subject.

Columns (design section 5): subject_id, stage, state, error, attempts,
started_at, finished_at.  Timestamps are ISO-8601 UTC strings (nullable), so
the file reads the same in pyarrow, pandas and DuckDB without tz surprises.

Concurrency: the table is rewritten whole on every update (read, modify,
atomic write).  That is only safe with ONE writer, so the job driver is the
single writer: Ray workers report results back to the driver, which calls
:meth:`JobStatus.update` / :meth:`JobStatus.set_many`.  Readers (``blockskip
status``) may read at any time and always see a complete table.
"""

from __future__ import annotations

import datetime as _dt
import threading
from typing import Any, Iterable

import pyarrow as pa

from .ids import validate_id
from .uri import Store

__all__ = ["JobStatus", "STATES", "STATUS_SCHEMA", "status_key", "utc_now"]

STATES = ("pending", "running", "succeeded", "failed", "skipped")
COLUMNS = ("subject_id", "stage", "state", "error", "attempts", "started_at", "finished_at")
STATUS_SCHEMA = pa.schema([
    ("subject_id", pa.string()),
    ("stage", pa.string()),
    ("state", pa.string()),
    ("error", pa.string()),
    ("attempts", pa.int64()),
    ("started_at", pa.string()),
    ("finished_at", pa.string()),
])
_DEFAULTS: dict[str, Any] = {"stage": "", "state": "pending", "error": None, "attempts": 0,
                             "started_at": None, "finished_at": None}


def status_key(job_id: str) -> str:
    return f"jobs/{validate_id(job_id, kind='job id')}/status.parquet"


def utc_now() -> str:
    """Current UTC time as an ISO-8601 string (the format of started_at/finished_at)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _norm_time(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, _dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=_dt.timezone.utc)
        return v.astimezone(_dt.timezone.utc).isoformat(timespec="seconds")
    if isinstance(v, (int, float)):  # epoch seconds
        return _dt.datetime.fromtimestamp(v, _dt.timezone.utc).isoformat(timespec="seconds")
    return str(v)


def _norm_row(row: dict[str, Any]) -> dict[str, Any]:
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown status columns: {sorted(unknown)} (allowed: {COLUMNS})")
    out = {**_DEFAULTS, **row}
    out["subject_id"] = validate_id(out["subject_id"])
    if out["state"] not in STATES:
        raise ValueError(f"invalid state {out['state']!r}: one of {STATES}")
    out["stage"] = str(out["stage"])
    out["error"] = None if out["error"] is None else str(out["error"])
    out["attempts"] = int(out["attempts"])
    out["started_at"] = _norm_time(out["started_at"])
    out["finished_at"] = _norm_time(out["finished_at"])
    return {c: out[c] for c in COLUMNS}


class JobStatus:
    """Read and upsert the status rows of one job (driver = single writer)."""

    def __init__(self, store: Store, job_id: str) -> None:
        self.job_id = validate_id(job_id, kind="job id")
        self.store = store
        self.key = status_key(job_id)
        self._lock = threading.Lock()  # threads inside the driver process

    def read(self) -> list[dict[str, Any]]:
        """All rows sorted by subject_id; [] when the job has no table yet."""
        try:
            table = self.store.read_table(self.key)
        except FileNotFoundError:
            return []
        return sorted(table.to_pylist(), key=lambda r: r["subject_id"])

    def _write(self, rows: Iterable[dict[str, Any]]) -> None:
        ordered = sorted(rows, key=lambda r: r["subject_id"])
        self.store.write_table(self.key, pa.Table.from_pylist(ordered, schema=STATUS_SCHEMA))

    def set_many(self, rows: Iterable[dict[str, Any]]) -> None:
        """Upsert several rows at once (one rewrite); each needs a subject_id. Like `update`, the fields a
        row leaves out keep their old values (defaults only for a new subject)."""
        self._upsert(rows)

    def update(self, subject_id: str, **fields: Any) -> dict[str, Any]:
        """Upsert one subject's row: unspecified fields keep their old values."""
        return self._upsert([{**fields, "subject_id": subject_id}])[subject_id]

    def _upsert(self, rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        rows = list(rows)
        for r in rows:
            if "subject_id" not in r:
                raise ValueError(f"status row without subject_id: {r!r}")
            validate_id(r["subject_id"])
        with self._lock:
            current = {r["subject_id"]: r for r in self.read()}
            for r in rows:
                current[r["subject_id"]] = _norm_row({**current.get(r["subject_id"], {}), **r})
            self._write(current.values())
        return current

    def format_table(self) -> str:
        """A fixed-width text table for ``blockskip status``."""
        rows = self.read()
        if not rows:
            return f"job {self.job_id}: no status recorded"
        headers = list(COLUMNS)
        cells = [[("" if r[c] is None else str(r[c])).replace("\n", " ")[:80] for c in headers] for r in rows]
        widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
        line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        summary = ", ".join(f"{counts[s]} {s}" for s in STATES if s in counts)
        out = [f"job {self.job_id}: {len(rows)} subjects ({summary})", line(headers),
               line(["-" * w for w in widths])]
        out += [line(c) for c in cells]
        return "\n".join(out)

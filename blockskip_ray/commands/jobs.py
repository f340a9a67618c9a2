"""`blockskip jobs --store URI`: every job in a store with its subject counts per state."""
from __future__ import annotations

import argparse
import json

STATES = ("pending", "running", "succeeded", "failed", "skipped")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "jobs", help="list the jobs in a store with their subject counts",
        description="List the jobs of a store (jobs/*/status.parquet): per job the number of subjects and how "
                    "many are pending, running, succeeded, failed and skipped. `blockskip status JOB_ID` shows "
                    "one job's subjects.")
    p.add_argument("--store", default="blockskip-store", help="store URI (local path or s3://bucket/prefix)")
    p.add_argument("--json", action="store_true", help="print one JSON object per job instead of a table")
    p.set_defaults(func=run)


def job_counts(store) -> list[dict]:
    """[{job_id, subjects, pending, running, ...}] for every job directory with a valid id, sorted by id."""
    from ..store import JobStatus
    from ..store.ids import is_valid_id

    out = []
    for entry in store.list("jobs", recursive=False):
        job_id = entry.rstrip("/").rsplit("/", 1)[-1]
        if not entry.endswith("/") or not is_valid_id(job_id):
            continue  # a file or a hand-made directory that is not a job
        rows = JobStatus(store, job_id).read()
        counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
        out.append({"job_id": job_id, "subjects": len(rows), **counts})
    return out


def run(args: argparse.Namespace) -> int:
    from ..store import Store

    jobs = job_counts(Store.open(args.store))
    if args.json:
        for j in jobs:
            print(json.dumps(j))
        return 0
    if not jobs:
        print(f"no jobs in {args.store}")
        return 0
    headers = ("job_id", "subjects", *STATES)
    cells = [[str(j[h]) for h in headers] for j in jobs]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    for row in (list(headers), *cells):
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    return 0

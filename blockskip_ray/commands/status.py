"""`blockskip status JOB_ID --store URI`: print a job's status table."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "status", help="print a catalog job's status table",
        description="Print jobs/JOB_ID/status.parquet of the store: one row per subject with its stage, state "
                    "(pending/running/succeeded/failed/skipped), error, attempts and timings.")
    p.add_argument("job_id", help="the job's id (job_id in its YAML)")
    p.add_argument("--store", default="blockskip-store", help="store URI (local path or s3://bucket/prefix)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..store import JobStatus, Store

    status = JobStatus(Store.open(args.store), args.job_id)
    if args.json:
        from ..store.status import jsonable

        print(json.dumps(jsonable(status.read()), indent=1))
        return 0
    rows = status.read()
    if not rows:
        raise FileNotFoundError(f"job {args.job_id}: no status table in {args.store}")
    print(status.format_table())
    return 0

"""`blockskip status JOB_ID --store URI`: print a job's status table, with the progress of running subjects."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "status", help="print a catalog job's status table",
        description="Print jobs/JOB_ID/status.parquet of the store: one row per subject with its stage, state "
                    "(pending/running/succeeded/failed/skipped), error, attempts and timings; for running "
                    "subjects also the training step, loss and ETA (subjects/ID/progress.json, written by the "
                    "trainer). `blockskip jobs` lists the jobs.")
    p.add_argument("job_id", help="the job's id (job_id in its YAML)")
    p.add_argument("--store", default="blockskip-store", help="store URI (local path or s3://bucket/prefix)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON (running rows get a 'progress' field)")
    p.set_defaults(func=run)


def read_progress(store, subject_id: str) -> dict | None:
    """The subject's last progress record, or None when it has none (not started, or unreadable)."""
    try:
        return store.read_json(f"subjects/{subject_id}/progress.json")
    except (FileNotFoundError, ValueError):
        return None



def format_progress(subject_id: str, p: dict) -> str:
    loss = "" if p.get("loss") is None else f", loss {p['loss']:.4f}"
    eta = "" if p.get("eta_s") is None else f", ETA {p['eta_s']:.0f} s"
    return f"  {subject_id}: step {p['step']}/{p['steps']}{loss}{eta}"


def run(args: argparse.Namespace) -> int:
    from ..store.lease import describe_driver
    from ..store.status import JobStatus, jsonable
    from ..store.uri import Store

    store = Store.open(args.store)
    status = JobStatus(store, args.job_id)
    rows = status.read()
    running = {r["subject_id"]: read_progress(store, r["subject_id"]) for r in rows if r["state"] == "running"}
    if args.json:
        print(json.dumps([r | ({"progress": running[r["subject_id"]]} if r["subject_id"] in running else {})
                          for r in jsonable(rows)], indent=1))
        return 0
    if not rows:
        raise FileNotFoundError(f"job {args.job_id}: no status table in {args.store}")
    print(status.format_table())
    lines = [format_progress(sid, p) for sid, p in running.items() if p]
    if lines:
        print("training:")
        print("\n".join(lines))
    driver = describe_driver(store, args.job_id)  # finished / exited: SIGTERM / died without closing
    if driver:
        print(driver)
    return 0

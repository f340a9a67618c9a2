"""`blockskip run JOB.yaml [--store URI] [key=value ...]`: a catalog job on the current Ray cluster."""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run a catalog job (validate, select, precompute, train, sample) on Ray",
        description="Run a catalog job on the current Ray cluster (ray.init(address='auto')), or on a local one "
                    "started for it: validate the catalog, select the skip split, precompute features, train every "
                    "subject as a Ray Train run (several at once), write adapters, metrics and samples to the store. "
                    "Rerunning a job continues it. Exits 1 when any subject failed.",
        epilog="Overrides use the YAML's keys: train.steps=200 ray.concurrency=4 catalog=cat.jsonl strict=true")
    p.add_argument("job", help="job spec YAML (see jobs/*.yaml and docs/jobs.md)")
    p.add_argument("--store", help="store URI (local path or s3://bucket/prefix); overrides the job's store")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's, Ray Train's and the libraries' output (default: WORK_DIR/JOB_ID.log only)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE",
                   help="override any job field, nested with dots")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..distributed.jobs import run_job, summary
    from ..distributed.jobspec import load_spec
    from ._overrides import take_options

    overrides = take_options(args, list(args.overrides), {"store": str, "verbose": None})
    overrides = overrides + ([f"store={args.store}"] if args.store else [])
    job = load_spec(args.job, overrides)
    from ..distributed.console import console
    from ..store.uri import Store

    log_file = f"{job.work_dir}/{job.job_id}.log"
    with console(getattr(args, "verbose", False), log_file) as con:
        if not con.verbose:
            con.event(f"[{job.job_id}] Ray and library output: {log_file} (--verbose shows it)")
        with con.watch(Store.open(job.store), job.job_id):
            result = run_job(job, log=con.event)
        con.event(summary(result))
    return 0 if result.ok else 1


if __name__ == "__main__":  # `python -m blockskip_ray.commands.run JOB.yaml ...` (used by `blockskip submit`)
    parser = argparse.ArgumentParser(prog="blockskip")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(["run", *sys.argv[1:]])
    try:
        sys.exit(ns.func(ns))
    except (ValueError, FileNotFoundError) as e:
        print(f"blockskip run: error: {e}", file=sys.stderr)
        sys.exit(2)

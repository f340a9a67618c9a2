"""`blockskip submit JOB.yaml --address http://HEAD:8265 [--store URI] [key=value ...]`."""
from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "submit", help="submit a catalog job to a remote Ray cluster (Ray job server)",
        description="Submit `blockskip run JOB.yaml` to a Ray cluster through its job server (dashboard address, "
                    "e.g. http://HEAD:8265). The checkout holding JOB.yaml (or --working-dir) is uploaded as the "
                    "job's working_dir; relative paths in the job resolve there. The spec and overrides are "
                    "validated before anything is uploaded.")
    p.add_argument("job", help="job spec YAML")
    p.add_argument("--address", help="Ray job server address, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
    p.add_argument("--store", help="store URI for the job (overrides the YAML's store)")
    p.add_argument("--working-dir", help="directory uploaded as the job's working_dir (default: the checkout "
                                          "holding JOB.yaml, else JOB.yaml's directory)")
    p.add_argument("--python", default="python", help="python on the cluster's PATH that runs the job (default python)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end and print its logs; exit 1 unless it "
                                                        "SUCCEEDED")
    p.add_argument("--timeout", type=float, default=24 * 3600, help="with --wait: give up after this many seconds")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE",
                   help="override any job field, nested with dots")
    p.set_defaults(func=run)


def follow_hint(address: str, sid: str) -> str:
    """The `ray job logs` command to follow the job; with a token in RAY_AUTH_TOKEN the ray CLI also needs
    RAY_AUTH_MODE=token (it ignores the token otherwise)."""
    auth = "RAY_AUTH_MODE=token " if os.environ.get("RAY_AUTH_TOKEN", "").strip() else ""
    return f"{auth}ray job logs --address {address} --follow {sid}"


def run(args: argparse.Namespace) -> int:
    from ..distributed.submit import logs, submit, wait
    from ._overrides import take_options

    args.overrides = take_options(args, list(args.overrides), {
        "address": str, "store": str, "working_dir": str, "python": str, "wait": None, "timeout": float})
    args.address = args.address or os.environ.get("RAY_ADDRESS", "").strip() or None
    if not args.address:
        raise ValueError("--address (or RAY_ADDRESS) is required: the Ray job server, e.g. http://HEAD:8265")
    sid, entrypoint = submit(args.job, args.address, args.store, list(args.overrides), args.working_dir, args.python)
    print(f"submitted {sid}: {entrypoint}")
    print(f"follow: {follow_hint(args.address, sid)}")
    if not args.wait:
        return 0
    status = wait(args.address, sid, timeout_s=args.timeout)
    print(logs(args.address, sid))
    return 0 if status == "SUCCEEDED" else 1

"""Wall time of a catalog job of N tiny subjects at concurrency 1 and 2, on one local Ray, in the same run.

    PYTHONPATH=. python benchmarks/catalog_concurrency.py --subjects 4 --steps 20

Each setting runs the whole `blockskip run` path (Ray Train run per subject, checkpoints, adapter, samples) into its
own fresh store, on the same tiny FLUX model and the same synthetic catalog, so only the concurrency differs.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--concurrency", default="1,2", help="comma-separated settings to compare")
    ap.add_argument("--keep", help="keep the stores under this directory")
    args = ap.parse_args()

    import ray

    from blockskip_ray.distributed.jobs import run_job
    from blockskip_ray.distributed.jobspec import load_spec

    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-catalog-"))
    work = root / "work"
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for c in [int(x) for x in args.concurrency.split(",")]:
            job = load_spec({
                "job_id": f"bench-c{c}", "model": "tiny:flux", "catalog": f"synthetic:{args.subjects}",
                "store": str(root / f"store-c{c}"), "work_dir": str(work),
                "train": {"steps": args.steps, "resolution": 64, "max_text_tokens": 16, "checkpoint_every": 10,
                          "rank": 4, "lr": 1e-3},
                "samples": {"num": 1, "steps": 2, "size": 64},
                "ray": {"concurrency": c, "cpus_per_subject": 1, "max_failures": 0},
                "selection": {"enabled": False}})
            from blockskip_ray.distributed.jobs import resolve_catalog, resolve_model
            resolve_model(job, log=lambda m: None), resolve_catalog(job, log=lambda m: None)  # built outside the timing
            t0 = time.perf_counter()
            result = run_job(job, log=lambda m: None)
            wall = time.perf_counter() - t0
            if not result.ok:
                print(f"concurrency {c}: failed subjects {result.failed}", file=sys.stderr)
                return 1
            sps = [m["steps_per_s"] for m in result.metrics.values() if m.get("steps_per_s")]
            rows.append((c, wall, sum(sps) / len(sps)))
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    base = rows[0][1]
    print(f"\n{args.subjects} tiny FLUX subjects x {args.steps} steps, local Ray with {args.num_cpus} CPUs "
          f"({platform.machine()}, {os.cpu_count()} cores)")
    print(f"{'concurrency':>11}  {'wall s':>8}  {'vs c=' + str(rows[0][0]):>8}  {'train steps/s per subject':>26}")
    for c, wall, sps in rows:
        print(f"{c:>11}  {wall:8.1f}  {base / wall:7.2f}x  {sps:26.2f}")
    print("command: PYTHONPATH=. python benchmarks/catalog_concurrency.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A tiny catalog three ways, side by side in one run on one local Ray: one Ray Train run per subject (today's
default), the pool of long-lived workers unpacked (pack 1), and the pool packed (pack 4).

    PYTHONPATH=. python benchmarks/catalog_pool.py --subjects 16 --steps 20

Each setting runs `run_job` (precompute on Ray Data, training, checkpoints, adapters) into its own fresh store,
on the same tiny FLUX model and synthetic catalog; samples are off so training dominates. Columns: wall time of
the job, the fraction of the training slots' time spent inside training steps (sum of the subjects' step
time / (wall x slots), slots = concurrency or workers), and subjects per hour.
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
    ap.add_argument("--subjects", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--slots", type=int, default=2, help="concurrency (per-subject runs) and workers (pool)")
    ap.add_argument("--keep", help="keep the stores under this directory")
    args = ap.parse_args()

    import ray

    from blockskip_ray.distributed.jobs import resolve_catalog, resolve_model, run_job
    from blockskip_ray.distributed.jobspec import load_spec

    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-pool-"))
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    settings = [("per-subject Ray Train runs", {"concurrency": args.slots}),
                ("pool, unpacked (pack 1)", {"workers": args.slots, "pack": 1}),
                ("pool, packed (pack 4)", {"workers": args.slots, "pack": 4})]
    rows = []
    try:
        for i, (name, ray_cfg) in enumerate(settings):
            job = load_spec({
                "job_id": f"bench-pool-{i}", "model": "tiny:flux", "catalog": f"synthetic:{args.subjects}",
                "store": str(root / f"store-{i}"), "work_dir": str(root / "work"),
                "train": {"steps": args.steps, "resolution": 64, "max_text_tokens": 16, "checkpoint_every": 10,
                          "rank": 4, "lr": 1e-3},
                "samples": {"num": 0},
                "ray": {"cpus_per_subject": 1, "max_failures": 0, **ray_cfg},
                "selection": {"enabled": False}})
            resolve_model(job, log=lambda m: None), resolve_catalog(job, log=lambda m: None)  # outside the timing
            t0 = time.perf_counter()
            result = run_job(job, log=lambda m: None)
            wall = time.perf_counter() - t0
            if not result.ok:
                print(f"{name}: failed subjects {result.failed}", file=sys.stderr)
                return 1
            step_s = 0.0
            for m in result.metrics.values():
                if "train_step_s" in m:
                    step_s += m["train_step_s"]
                elif m.get("steps_per_s"):  # per-subject path: steps 2.. are timed; the first costs about as much
                    step_s += len(m["loss"]) / m["steps_per_s"]
            rows.append((name, wall, step_s / (wall * args.slots), args.subjects * 3600 / wall))
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.subjects} tiny FLUX subjects x {args.steps} steps, {args.slots} training slots, local Ray with "
          f"{args.num_cpus} CPUs ({platform.node()}, {os.cpu_count()} cores); "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'setting':<30}{'wall s':>9}{'x first':>9}{'in train steps':>16}{'subjects/hour':>15}")
    for name, wall, frac, sph in rows:
        print(f"{name:<30}{wall:>9.1f}{rows[0][1] / wall:>8.2f}x{frac:>15.0%}{sph:>15.0f}")
    print("command: PYTHONPATH=. python benchmarks/catalog_pool.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

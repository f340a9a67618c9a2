"""`blockskip demo`: the whole pipeline on local Ray with the embedded defaults (jobs/demo-toy.yaml).

the toy FLUX model pretrained here (shipped) -> 3 held-out toy subjects -> selection -> Ray Data precompute ->
subjects trained concurrently as Ray Train runs -> samples -> summary -> every adapter served over HTTP by
Ray Serve, one image per subject saved -> Serve and Ray shut down.
The job spec is embedded here verbatim (a test checks it equals jobs/demo-toy.yaml), so the demo works from an
installed wheel without the repository.
"""
from __future__ import annotations

import argparse
import time

import yaml

DEMO_JOB_YAML = """# blockskip run jobs/demo-toy.yaml        (or: blockskip demo)
# The demo: the toy FLUX model pretrained here (shipped in the package, docs/fidelity.md), personalized on 3
# held-out toys it never saw in pretraining; a local store, local Ray. Served images show each subject.
job_id: demo-toy
model: toy:flux                # the pretrained toy pipeline in blockskip_ray/toy/weights/flux
catalog: toy:3                 # 3 held-out toy subjects (reference images + catalog.jsonl) written into work_dir/catalog
store: demo-out/store
work_dir: demo-out/work
train:
  mode: blockskip
  steps: 200
  resolution: 32               # the toy model's full resolution: at 16 px (2x2 tokens) subjects are not learned (docs/fidelity.md)
  s_max: 32
  skip: [2, 2]                 # 30% of the 12 blocks, the default split (the probe's (0, 4) did not beat it)
  max_text_tokens: 16
  checkpoint_every: 50
  rank: 8
  lr: 0.001
samples:
  num: 1
  steps: 20
  size: 32
  eval: false
ray:
  address: local               # a private local Ray (auto: join the running cluster, else start one)
  num_cpus: 2
  concurrency: 2               # two subjects train at once
  cpus_per_subject: 1
  gpus_per_subject: 0
  max_failures: 1
selection:
  enabled: false               # the split is given above; `blockskip select --model toy:flux --dino toy:dino` runs the probes
  skip_ratios: [0.3]
  options: {steps: 8, resolution: 32, dino: "toy:dino", prompts: ["a toy on a pink background", "a striped red round toy with blue ears on a cyan background"]}
precompute: {feature_dtype: fp32}   # Ray Data pipeline options (PrecomputeConfig fields)
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="run the whole pipeline on the pretrained toy model with 3 held-out toy subjects (local Ray, CPU)",
        description="Run jobs/demo-toy.yaml (embedded): the toy FLUX model pretrained here, 3 held-out toy subjects, "
                    "select, precompute, train them concurrently on local Ray, sample, print a summary, then serve "
                    "every adapter from one HTTP endpoint (Ray Serve), request one image per subject and save it. "
                    "Outputs go to demo-out/ (store: demo-out/store, served images: demo-out/served).")
    p.add_argument("--out", default="demo-out", help="directory for the store and scratch files (default demo-out)")
    p.add_argument("--no-serve", action="store_true", help="stop after training (skip the HTTP serving step)")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's, Ray Train/Serve's and the libraries' output (default: OUT/demo.log only)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="KEY=VALUE",
                   help="override any field of the demo job")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..distributed.console import console
    from ..distributed.jobs import run_and_serve
    from ..distributed.jobspec import load_spec
    from ..store.uri import Store
    from ._overrides import take_options

    overrides = take_options(args, list(args.overrides), {"out": str, "no_serve": None, "verbose": None})
    data = yaml.safe_load(DEMO_JOB_YAML)
    data["store"], data["work_dir"] = f"{args.out}/store", f"{args.out}/work"
    job = load_spec(data, overrides)
    t0 = time.perf_counter()
    log_file = f"{args.out}/demo.log"
    with console(getattr(args, "verbose", False), log_file) as con:
        if not con.verbose:
            con.event(f"blockskip demo: {job.job_id} (Ray and library output: {log_file}; --verbose shows it)")
        with con.watch(Store.open(job.store), job.job_id):
            result, _ = run_and_serve(job, None if args.no_serve else f"{args.out}/served", report=con.event,
                                      log=con.event)
        con.event(f"demo finished in {time.perf_counter() - t0:.0f} s; outputs: {job.store}/subjects/*/ (adapter, "
                  f"samples, logs/, loss_curve.png); status: blockskip status {job.job_id} --store {job.store}")
    return 0 if result.ok else 1

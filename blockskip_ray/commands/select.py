"""`blockskip select`: measure the per-model skip table with cross-attention masking probes on Ray."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path



def register(sub) -> None:
    p = sub.add_parser(
        "select", help="measure the skip table (ratio -> n*, m*) of a model with masking probes on Ray",
        description="Cross-attention masking probes (paper Sec. 3.3) on the current Ray cluster (a local Ray is "
                    "started when none runs). Profiles windows of W masked blocks, then for every skip ratio masks "
                    "each split n + m = round(ratio*N) and keeps the one whose generations move least (1 - cos of "
                    "DINO embeddings). Writes models/{model_key}/selection.json and profile.png to the store.")
    p.add_argument("--model", required=True, help="local diffusers FLUX/SANA directory (e.g. from `blockskip init-model`)")
    p.add_argument("--store", required=True, help="store URI: a local path or s3://bucket/prefix")
    p.add_argument("--skip-ratios", default="0.3,0.5", help="comma-separated skip ratios in [0, 1) (default 0.3,0.5)")
    p.add_argument("--window", default="auto",
                   help="masked window W; 'auto' = 14 when the model has >= 28 blocks (the paper, FLUX), else max(1, N//3)")
    p.add_argument("--prompts", nargs="+", default=None,
                   help="probe prompts; '{subject}' is replaced by the subject's name "
                        "(default: 'a photo of sks {subject}' 'a photo of sks {subject} on a beach')")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--probe-subjects", nargs="+", default=None, metavar="DIR",
                   help="directories of subject images (name = directory name); default: 2 built-in synthetic subjects")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 4 for tiny models, 28 otherwise)")
    p.add_argument("--resolution", type=int, default=None, help="generation size (default: 64 tiny, 512 otherwise)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per generation task (0 = CPU; e.g. 1 on a GPU cluster)")
    p.add_argument("--ray-address", default="auto",
                   help="Ray cluster to join ('auto' = the running one, else a local Ray is started; 'local' = always "
                        "start a fresh local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray started when no cluster runs")
    p.add_argument("--dino", default=None,
                   help="DINOv2 model (local dir or store URI); default: a tiny RANDOM model (meaningless distances)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="first train full LoRA for K steps on each probe subject and probe the fine-tuned model (paper)")
    p.add_argument("--max-retries", type=int, default=2, help="retries per Ray task (default 2)")
    p.set_defaults(func=run)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from ..distributed.probes import ProbeConfig, ProbeSubject, ensure_ray, run_probe
    from ..method.images import make_synthetic_subject
    from ..probe.generate import generation_defaults, is_tiny_model
    from ..probe.search import make_plan
    from ..probe.selection import draw_profile, model_key, num_blocks_of, write_selection
    from ..probe.tiny_metrics import build_tiny_dino
    from ..store import Store

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from ..toy import resolve_model_arg
    args.model = resolve_model_arg(args.model)  # toy:flux -> the shipped directory
    ratios = _floats(args.skip_ratios, "--skip-ratios")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    key, n_blocks = model_key(args.model), num_blocks_of(args.model)
    plan = make_plan(n_blocks, ratios, args.window)  # bad ratios / window fail here, before Ray starts
    defaults = generation_defaults(args.model)
    store = Store.open(args.store)
    work = Path(tempfile.mkdtemp(prefix="blockskip-select-"))
    try:
        if args.probe_subjects:
            subjects = [ProbeSubject(Path(d).name, str(d)) for d in args.probe_subjects]
        else:
            subjects = []
            for i in range(2):
                d = work / f"robot-toy-{i}"
                make_synthetic_subject(d, n=4, size=128, seed=100 + i)
                subjects.append(ProbeSubject(d.name, str(d)))
            log(f"no --probe-subjects: using 2 built-in synthetic subjects in {work}")
        dino, tiny_dino = args.dino, False
        if dino is None:
            dino, tiny_dino = str(build_tiny_dino(work / "tiny-dino")), True
            log("=" * 78 + "\nWARNING: no --dino given: using a tiny RANDOM-WEIGHT DINOv2 built locally. The distances\n"
                "and the chosen splits only exercise the pipeline; they say nothing about the model.\n" + "=" * 78)
        cfg = ProbeConfig(model=str(Path(args.model).resolve()), subjects=subjects, ratios=ratios, seeds=seeds,
                          window=plan.window, steps=args.steps or defaults["steps"],
                          resolution=args.resolution or defaults["resolution"], dino=dino, num_gpus=args.num_gpus,
                          max_retries=args.max_retries, finetune_steps=args.finetune_steps)
        if args.prompts:
            cfg.prompts = list(args.prompts)
        log(f"model {args.model}: key {key}, N={n_blocks} blocks, window W={plan.window}, budgets "
            f"{plan.budgets}, steps {cfg.steps}, resolution {cfg.resolution}")
        t0 = time.monotonic()
        ensure_ray(args.num_cpus, log, args.ray_address)
        _, result = run_probe(cfg, n_blocks, log)
        doc = {"model_key": key, "model": str(args.model), "created_at": datetime.now(timezone.utc).isoformat(),
               "dino_tiny_random": tiny_dino, **result}
        if tiny_dino:  # its temp dir is gone after the run: say what it was instead
            doc["probe"]["dino"] = "tiny random-weight DINOv2 built locally (no --dino)"
        warn = ["tiny RANDOM-WEIGHT test model"] if is_tiny_model(args.model) else []
        warn += ["RANDOM-WEIGHT DINO"] if tiny_dino else []
        note = " + ".join(warn) + ": distances are not meaningful" if warn else None
        url = write_selection(store, doc, draw_profile(doc, note))
        log(f"done in {time.monotonic() - t0:.1f} s: {result['generations']} generations")
        print(json.dumps({"selection": url, "model_key": key, "table": doc["table"]}, indent=1))
        return 0
    finally:  # synthetic subjects and the tiny DINO are only needed while the tasks run
        shutil.rmtree(work, ignore_errors=True)

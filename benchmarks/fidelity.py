"""The paper's ablation on the pretrained toy model: one table of identity fidelity and text alignment.

    python benchmarks/fidelity.py [--model toy:flux] [--subjects 6] [--seeds 0,1] [--steps 150] [--out /tmp/fidelity]

For each held-out toy subject (never seen in pretraining) and seed, every configuration is trained with the
project's own code path (method/personalize.personalize, the modes of method/modes.py), then the stock
FluxPipeline + the adapter generates one image per evaluation prompt ('a sks toy on a <bg> background'),
scored with the project's metric path (probe/metrics.score_subject) using the toy metric models:
  identity fidelity = DINO role (toy identity encoder): mean cosine generated x reference images
  text alignment    = CLIP-T role (toy text-image scorer): cosine of each image with its prompt
The probe-selected split comes from the masking probes (probe/search.py, probe/generate.ProbeWorker) run
here on LoRA-fine-tuned probe subjects that are not evaluation subjects (the paper searches on other
categories than it evaluates on). Memory: the measured tensor peak of one training step (plan_cost.measure,
torch profiler) per configuration; step time: the trainer's own steps/s. Both as ratios to LoRA.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blockskip_ray.method.modes import default_split  # noqa: E402
from blockskip_ray.method.personalize import TrainSpec, num_blocks, personalize  # noqa: E402
from blockskip_ray.method.trainer import OptimConfig  # noqa: E402
from blockskip_ray.models.loading import generation_kwargs, load_pipeline  # noqa: E402
from blockskip_ray.probe.metrics import ClipEmbedder, DinoEmbedder, score_subject  # noqa: E402
from blockskip_ray.toy import resolve_model_arg  # noqa: E402
from blockskip_ray.toy.domain import SIZE, HELD_OUT, eval_prompts, subject_images, subject_prompt, write_subject  # noqa: E402


def configs(n: int, probe: dict[str, tuple[int, int]]) -> list[tuple[str, str, tuple[int, int] | None]]:
    """(name, mode, skip); skip None = the mode trains every block."""
    d30, d50 = default_split(0.3, n), default_split(0.5, n)
    k50 = round(0.5 * n)
    rows = [("base (no adapter)", "base", None), ("lora (full res)", "lora", None), ("lora low res (16 px)", "lora-low", None),
            ("blockskip 30% default", "blockskip", d30), ("blockskip 50% default", "blockskip", d50),
            ("blockskip 30% probe", "blockskip", probe["0.3"]), ("blockskip 50% probe", "blockskip", probe["0.5"]),
            ("naive skip 30%", "naive-skip", d30), ("naive skip 50%", "naive-skip", d50),
            ("resize 30% (no dyn. crop)", "resize", d30),
            ("skip first only 50%", "blockskip", (k50, 0)), ("skip last only 50%", "blockskip", (0, k50)),
            # not in the paper: block skipping alone at the full resolution (isolates skipping from resolution)
            ("skip+features 30% @32px", "resize@full", d30), ("naive skip 30% @32px", "naive-skip@full", d30)]
    return rows


def run_probe(model: str, dino: str, subjects: list[int], work: Path, args, log) -> dict:
    """Masking probes in this process (the same search as `blockskip select`, without Ray)."""
    from blockskip_ray.probe.generate import ProbeWorker, adapter_files
    from blockskip_ray.probe.search import make_plan, mean_distances, summarize

    n = num_blocks(model)
    plan = make_plan(n, [0.3, 0.5], "auto")
    worker = ProbeWorker(model, dino, "cpu")
    emb = {}
    for s in subjects:
        spec = _spec(model, s, 0, "lora", None, work / f"probe-ft-{s}", args)
        personalize(spec, log=lambda m: None)
        files = adapter_files(Path(spec.out) / "adapter")
        for p in eval_prompts()[:2]:
            for seed in (0, 1):
                for blocks in plan.masked_sets():
                    emb[((s, p, seed), blocks)] = torch.tensor(
                        worker.embed(p, seed, blocks, args.sample_steps, SIZE, files))
        log(f"  probe subject toy-{s}: {len(plan.masked_sets())} masked sets x 4 samples")
    return summarize(plan, mean_distances(emb))


def _spec(model: str, subject: int, seed: int, mode: str, skip, out: Path, args) -> TrainSpec:
    images = out.parent / f"refs-{subject}"
    if not images.is_dir():
        write_subject(subject, images)
    lora = mode in ("lora", "lora-low")  # lora-low: plain LoRA on the whole image resized to the low resolution
    full = mode == "lora" or mode.endswith("@full")  # MODE@full: that mode at the full resolution
    mode = mode.removesuffix("@full")
    return TrainSpec(model=model, images=str(images), prompt=subject_prompt(), out=str(out), subject_id=f"toy-{subject}",
                     skip=None if lora else skip, mode="lora" if lora else mode, steps=args.steps,
                     resolution=SIZE if full else SIZE // 2,
                     s_max=None if lora else SIZE, seed=seed, max_text_tokens=16, num_samples=0, device="cpu",
                     optim=OptimConfig(rank=args.rank, lr=args.lr))


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int, steps: int, cfg: float):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompts, negative_prompt=[""] * len(prompts), true_cfg_scale=cfg, num_inference_steps=steps,
                height=SIZE, width=SIZE, generator=g, **generation_kwargs(pipe)).images


def memory_peak(model: str, mode: str, skip, rank: int) -> int:
    from blockskip_ray.plan_cost.estimate import EstimateSpec
    from blockskip_ray.plan_cost.measure import measure_cpu

    lora = mode in ("lora", "lora-low")
    res = SIZE if mode == "lora" or mode.endswith("@full") else SIZE // 2
    mode = mode.removesuffix("@full")
    spec = EstimateSpec(model=model, resolution=res, skip=None if lora else skip,
                        mode="lora" if lora else mode, rank=rank, text_tokens=16, target="cpu")
    return measure_cpu(spec)["peak_memory_bytes"]


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy:flux")
    p.add_argument("--dino", default="toy:dino")
    p.add_argument("--clip", default="toy:clip")
    p.add_argument("--subjects", type=int, default=6, help="evaluation subjects: held-out toys 0..S-1")
    p.add_argument("--probe-subjects", default="6,7", help="held-out toys fine-tuned for the probes (not evaluated)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=150, help="personalization steps (every configuration)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sample-steps", type=int, default=16)
    p.add_argument("--cfg", type=float, default=3.0, help="true CFG scale of the evaluation generations")
    p.add_argument("--only", default=None,
                   help="comma-separated configuration names to run now (parallel processes sharing --out); "
                        "a run without --only prints the table once every configuration is cached")
    p.add_argument("--out", default=None, help="work dir (default: a temp dir): probe.json, results/*.json (cached "
                                                "per configuration), images/, results.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, dino_dir, clip_dir = (resolve_model_arg(x) for x in (args.model, args.dino, args.clip))
    work = Path(args.out or tempfile.mkdtemp(prefix="fidelity-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t0:6.0f}s] {m}", file=sys.stderr, flush=True)  # noqa: E731
    seeds = [int(s) for s in args.seeds.split(",")]
    subjects = list(range(args.subjects))
    if args.subjects > len(HELD_OUT) - 2:
        raise ValueError(f"at most {len(HELD_OUT) - 2} evaluation subjects (the last 2 held-out toys are the probe subjects)")
    n = num_blocks(model)
    probe_file = work / "probe.json"  # cached: parallel runs (--only) share one probe and one work dir
    need_probe = not args.only or "probe" in args.only
    if probe_file.is_file():
        probe = json.loads(probe_file.read_text())
    elif need_probe:
        probe = run_probe(model, dino_dir, [int(x) for x in args.probe_subjects.split(",")], work, args, log)
        probe_file.write_text(json.dumps(probe, indent=1))
    else:  # this run trains no probe-split configuration: the probe is not needed yet
        probe = {"table": {"0.3": default_split(0.3, n), "0.5": default_split(0.5, n)}}
    table = {k: tuple(v) for k, v in probe["table"].items()}
    if need_probe:
        log(f"probe-selected splits: {table} (default: 0.3 -> {default_split(0.3, n)}, 0.5 -> {default_split(0.5, n)})")
    rows = configs(n, table)
    todo = rows if not args.only else [r for r in rows if r[0] in set(args.only.split(","))]
    dino, clip = DinoEmbedder(dino_dir), ClipEmbedder(clip_dir)
    pipe = load_pipeline(model, "cpu")
    cache = work / "results"
    cache.mkdir(exist_ok=True)
    for name, mode, skip in todo:
        f = cache / f"{mode}-{'full' if skip is None else f'{skip[0]}-{skip[1]}'}.json"
        if f.is_file():
            continue
        r = {"mode": mode, "skip": skip, "dino": [], "clip_i": [], "clip_t": [], "steps_per_s": []}
        for s in subjects:
            refs = subject_images(s)
            for seed in seeds:
                if mode == "base":
                    ims = generate(pipe, eval_prompts(), 1000 + seed, args.sample_steps, args.cfg)
                else:
                    spec = _spec(model, s, seed, mode, skip, work / f"{mode}-{skip}-{s}-{seed}", args)
                    metrics = personalize(spec, log=lambda m: None)
                    r["steps_per_s"].append(metrics["steps_per_s"])
                    pipe.load_lora_weights(str(Path(spec.out) / "adapter"))
                    ims = generate(pipe, eval_prompts(), 1000 + seed, args.sample_steps, args.cfg)
                    pipe.unload_lora_weights()
                for i, im in enumerate(ims):
                    d = work / "images" / f.stem
                    d.mkdir(parents=True, exist_ok=True)
                    im.save(d / f"s{s}_seed{seed}_p{i}.png")
                sc = score_subject({p: [im] for p, im in zip(eval_prompts(), ims)}, refs, dino, clip)
                r["dino"].append(sc.dino)
                r["clip_i"].append(sc.clip_i)
                r["clip_t"].append(sc.clip_t)
        r["peak_bytes"] = memory_peak(model, mode, skip, args.rank) if mode != "base" else None
        f.write_text(json.dumps(r))
        log(f"{name}: DINO {_ms(r['dino'])}  CLIP-T {_ms(r['clip_t'])}")
    results: dict[str, dict] = {}
    for name, mode, skip in rows:
        f = cache / f"{mode}-{'full' if skip is None else f'{skip[0]}-{skip[1]}'}.json"
        if f.is_file():
            results[name] = json.loads(f.read_text())
    if args.only or len(results) < len(rows):
        log(f"{len(results)}/{len(rows)} configurations done in {work}; run again without --only for the table")
        return 0
    lora = results["lora (full res)"]
    lora_time = 1 / statistics.mean(lora["steps_per_s"])
    print(f"toy:flux ablation — {len(subjects)} held-out subjects x {len(seeds)} seeds, {args.steps} steps, rank {args.rank}, "
          f"lr {args.lr}, eval {len(eval_prompts())} prompts x 1 image, {args.sample_steps} sampling steps, true CFG {args.cfg}")
    print(f"{'configuration':<27} {'skip n,m':>8}  {'identity (DINO role)':>21}  {'CLIP-I role':>17}  "
          f"{'text (CLIP-T role)':>19}  {'mem/LoRA':>8} {'time/LoRA':>9}")
    for name, r in results.items():
        skip = "-" if r["skip"] is None else f"{r['skip'][0]},{r['skip'][1]}"
        mem = r["peak_bytes"] / lora["peak_bytes"] if r["mode"] != "base" else float("nan")
        tm = (1 / statistics.mean(r["steps_per_s"])) / lora_time if r["steps_per_s"] else float("nan")
        twin = [k for k, v in results.items() if k != name and (v["mode"], v["skip"]) == (r["mode"], r["skip"])]
        same = f"  (same run as: {twin[0]})" if twin else ""
        print(f"{name:<27} {skip:>8}  {_ms(r['dino']):>21}  {_ms(r['clip_i']):>17}  {_ms(r['clip_t']):>19}  "
              f"{mem:8.2f} {tm:9.2f}{same}")
    (work / "results.json").write_text(json.dumps({"args": vars(args), "probe": probe, "results": results}, indent=1,
                                                  default=list))
    log(f"results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

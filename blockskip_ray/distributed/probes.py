"""Block-selection probes on Ray: every generation is an independent, retried Ray task.

The driver validates the inputs, optionally fine-tunes LoRA per probe subject (one task per subject,
as the paper probes a fine-tuned model), submits every generation at once, and waits with a progress
line. Each worker process loads the pipeline and the DINO model once (`_WORKERS` cache), so tasks that
land on the same process reuse them; tasks on different processes / GPUs run concurrently.
"""
from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import ray

from ..method.images import list_images, load_images
from ..probe.generate import AdapterFiles, ProbeWorker, adapter_files
from ..probe.search import ProbePlan, make_plan, mean_distances, summarize

_WORKERS: dict[tuple[str, str, str], ProbeWorker] = {}


@dataclass
class ProbeSubject:
    name: str
    images: str  # a local directory of reference images (read by the driver, shipped as bytes)


@dataclass
class ProbeConfig:
    model: str
    subjects: list[ProbeSubject]
    ratios: list[float]
    prompts: list[str] = field(default_factory=lambda: ["a photo of sks {subject}", "a photo of sks {subject} on a beach"])
    seeds: list[int] = field(default_factory=lambda: [0])
    window: int | str = "auto"
    steps: int = 4
    resolution: int = 64
    dino: str = ""
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    device: str = "auto"
    max_retries: int = 2
    finetune_steps: int = 0
    finetune_resolution: int | None = None
    instance_prompt: str = "a photo of sks {subject}"


def ensure_ray(num_cpus: int | None = None, log: Callable[[str], None] = print, address: str = "auto") -> None:
    """Join the running cluster (`address`, default 'auto'), or start a local Ray when there is none.
    address='local' always starts a fresh local Ray (e.g. on a shared machine with someone else's Ray)."""
    from .ray_address import init
    if ray.is_initialized():
        return
    init(address, num_cpus, log=log, log_to_driver=False)  # a dead recorded cluster: a local Ray, in seconds


def _worker(model: str, dino: str, device: str) -> ProbeWorker:
    key = (model, dino, device)
    if key not in _WORKERS:
        _WORKERS.clear()  # one pipeline per process: a different model replaces the cached one
        _WORKERS[key] = ProbeWorker(model, dino, device)
    return _WORKERS[key]


def _embed_task(model: str, dino: str, device: str, prompt: str, seed: int, blocks: list[int], steps: int,
                size: int, adapter: AdapterFiles | None) -> list[float]:
    return _worker(model, dino, device).embed(prompt, seed, frozenset(blocks), steps, size, adapter)


def _finetune_task(model: str, name: str, images: dict[str, bytes], prompt: str, steps: int, resolution: int,
                   seed: int, device: str) -> AdapterFiles:
    from ..method.personalize import TrainSpec, personalize

    with tempfile.TemporaryDirectory(prefix="blockskip-probe-ft-") as tmp:
        img_dir = Path(tmp) / "images"
        img_dir.mkdir()
        for fname, data in images.items():
            (img_dir / Path(fname).name).write_bytes(data)
        out = Path(tmp) / "out"
        personalize(TrainSpec(model=model, images=str(img_dir), prompt=prompt, out=str(out), subject_id="probe",
                              mode="lora", steps=steps, resolution=resolution, seed=seed, num_samples=0,
                              device=device), log=lambda s: None)
        return adapter_files(out / "adapter")


def task_options(cfg: ProbeConfig) -> dict:
    """Every probe task: its resources, and retries on worker death *and* on exceptions (a flaky GPU/node)."""
    return dict(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_retries=cfg.max_retries, retry_exceptions=True)


def check_subjects(subjects: list[ProbeSubject]) -> None:
    if not subjects:
        raise ValueError("no probe subjects")
    for s in subjects:
        try:
            load_images(s.images)  # every image must decode: a probe must not die on the cluster later
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"probe subject {s.name!r} has no usable images: {e}") from None


def _wait(refs: list, what: str, log: Callable[[str], None]) -> list:
    """ray.wait with a progress line; results in submission order."""
    pending, done, t0, last = list(refs), 0, time.monotonic(), 0.0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=30)
        done += len(ready)
        if ready:
            ray.get(ready)  # surface a failed task (after its retries) at once
        now = time.monotonic()
        if not pending or now - last > 2 or not ready:
            log(f"  {what}: {done}/{len(refs)} done ({now - t0:.0f} s)")
            last = now
    return ray.get(refs)


def run_probe(cfg: ProbeConfig, num_blocks: int, log: Callable[[str], None] = print) -> tuple[ProbePlan, dict]:
    """Returns the plan and the selection document's search part + run facts."""
    plan = make_plan(num_blocks, cfg.ratios, cfg.window)
    check_subjects(cfg.subjects)
    if not cfg.prompts or not cfg.seeds:
        raise ValueError("give at least one prompt and one seed")
    t0 = time.monotonic()
    opts = task_options(cfg)
    adapters: dict[str, object] = {s.name: None for s in cfg.subjects}
    if cfg.finetune_steps:
        ft = ray.remote(_finetune_task).options(**opts)
        refs = [ft.remote(cfg.model, s.name, {p.name: p.read_bytes() for p in list_images(s.images)},
                          cfg.instance_prompt.replace("{subject}", s.name), cfg.finetune_steps,
                          cfg.finetune_resolution or cfg.resolution, 0, cfg.device) for s in cfg.subjects]
        log(f"fine-tuning LoRA on {len(refs)} probe subjects ({cfg.finetune_steps} steps each)")
        _wait(refs, "fine-tunes", log)
        adapters = {s.name: r for s, r in zip(cfg.subjects, refs)}  # refs: shipped to tasks without a round trip
    sets = plan.masked_sets()
    task = ray.remote(_embed_task).options(**opts)
    keys, refs = [], []
    for s in cfg.subjects:  # subject-major order: a worker switches adapters rarely
        for prompt in cfg.prompts:
            text = prompt.replace("{subject}", s.name)
            for seed in cfg.seeds:
                for b in sets:
                    keys.append(((s.name, text, seed), b))
                    refs.append(task.remote(cfg.model, cfg.dino, cfg.device, text, seed, sorted(b), cfg.steps,
                                            cfg.resolution, adapters[s.name]))
    log(f"probing: {len(refs)} generations ({len(sets)} masked sets x {len(refs) // len(sets)} samples)")
    embeddings = dict(zip(keys, _wait(refs, "generations", log)))
    result = summarize(plan, mean_distances(embeddings))
    cfg_doc = asdict(cfg)
    cfg_doc["subjects"] = [s.name for s in cfg.subjects]
    result.update(probe=cfg_doc, generations=len(refs), generations_per_sample=plan.generations_per_sample(),
                  elapsed_s=round(time.monotonic() - t0, 2))
    return plan, result


__all__ = ["ProbeConfig", "ProbeSubject", "ensure_ray", "run_probe", "check_subjects"]

"""Personalize one subject on one device: plan -> precompute -> block-skipped training -> adapter + samples.

This is the code path of `blockskip train`; the Ray layer calls the same functions per subject.
"""
from __future__ import annotations

import gc
import json
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..models.loading import generation_kwargs, load_kept_transformer, load_pipeline, model_family, pixel_multiple
from .curves import PROGRESS_FILE, TrainingCurves, current_memory_bytes, file_sink, sample_grid
from .features import FeatureComputer
from .images import DEFAULT_MAX_PIXELS, load_images
from .lora import lora_state_dict
from .modes import check_skip, default_split, get_mode
from .sampling import PlanConfig, build_plan
from .trainer import OptimConfig, SkipTrainer


@dataclass
class TrainSpec:
    """Everything `blockskip train` takes; the constructor signature is the config."""

    model: str
    images: str
    prompt: str
    out: str
    subject_id: str = "subject"
    skip: tuple[int, int] | None = None
    skip_ratio: float | None = None
    mode: str = "blockskip"
    steps: int = 500
    resolution: int = 256  # s_min (or the fixed resolution of --mode lora)
    s_max: int | None = None
    seed: int = 0
    max_text_tokens: int = 512
    checkpoint_every: int = 0
    num_samples: int = 2
    sample_steps: int = 20
    sample_size: int | None = None
    device: str = "auto"
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS  # per-image pixel budget, checked from the header


def num_blocks(model: str) -> int:
    cfg = json.loads((Path(model) / "transformer" / "config.json").read_text())
    return cfg["num_layers"] + cfg.get("num_single_layers", 0)


def resolve_skip(spec: TrainSpec, n_blocks: int, lookup: Callable[[float], tuple[int, int] | None] | None = None,
                 log: Callable[[str], None] = print) -> tuple[int, int]:
    mode = get_mode(spec.mode)
    if spec.skip is not None and spec.skip_ratio is not None:
        raise ValueError("give either --skip or --skip-ratio, not both")
    if not mode.skips:
        if spec.skip not in (None, (0, 0)) or spec.skip_ratio:
            raise ValueError(f"--mode {spec.mode} trains every block: --skip / --skip-ratio do not apply")
        return 0, 0
    if spec.skip is not None:
        return check_skip(spec.skip, n_blocks)
    ratio = 0.3 if spec.skip_ratio is None else spec.skip_ratio
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"skip ratio must be in [0, 1), got {ratio}")
    found = lookup(ratio) if lookup else None
    if found is not None:
        log(f"skip ratio {ratio}: split {found[0]},{found[1]} from the selection table")
        return check_skip(found, n_blocks)
    split = default_split(ratio, n_blocks)
    log(f"skip ratio {ratio}: no selection table for this model, using the default split "
        f"n={split[0]}, m={split[1]} (k = round(ratio*N) halved, extra block at the front; run `blockskip select` for a measured one)")
    return check_skip(split, n_blocks)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prepare(spec: TrainSpec, lookup=None, log: Callable[[str], None] = print):
    """Validate everything before any work or output: returns (family, images, plan, skip)."""
    family = model_family(spec.model)
    images = load_images(spec.images, spec.max_image_pixels)
    skip = resolve_skip(spec, num_blocks(spec.model), lookup, log)
    mode = get_mode(spec.mode)
    multiple = pixel_multiple(spec.model)
    plan = build_plan(spec.subject_id, [im.size for im in images],
                      PlanConfig(steps=spec.steps, s_min=spec.resolution, s_max=spec.s_max, sampling=mode.sampling,
                                 seed=spec.seed), multiple)
    return family, images, plan, skip


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr when it is a terminal (disabled otherwise, and when not `enabled`)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False,
                disable=not (enabled and sys.stderr.isatty()))


def precompute(spec: TrainSpec, images, plan: list[dict], skip: tuple[int, int], device: torch.device,
               progress: bool = True) -> tuple[dict, Iterable[tuple[int, dict]]]:
    """Load the frozen pipeline once, compute the subject's text and every step's features."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = load_pipeline(spec.model, device, dtype)
    fc = FeatureComputer(pipe, skip, get_mode(spec.mode), spec.max_text_tokens, spec.optim.guidance)
    text = fc.text(spec.prompt)
    feats = []
    bar = progress_bar(len(plan), "precompute", enabled=progress)
    for i, (step, f) in enumerate(fc.iter_steps(images, plan, text)):
        feats.append((step, f))
        bar.update(1)
        if progress and bar.disable and (i + 1) % max(1, len(plan) // 10) == 0:  # no terminal: plain lines
            print(f"  precompute {i + 1}/{len(plan)}", file=sys.stderr, flush=True)
    bar.close()
    del pipe, fc
    gc.collect()
    return text, feats


_PEAK_RESET = [False]  # whether this process's CPU peak window was reset (see reset_peak_memory)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (the training phase). On CPU the process RSS high-water mark is reset
    through /proc/self/clear_refs (Linux >= 4.0); where that is not allowed, `peak_memory` says so."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets VmHWM, the peak resident set size (proc(5))
        _PEAK_RESET[0] = True
    except OSError:
        _PEAK_RESET[0] = False


def _vm_hwm() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): the peak since `reset_peak_memory`, with a kind that names what it covers.

    cuda_max_memory_allocated: tensors on the GPU since the reset (the training phase).
    cpu_peak_rss_train: the process's peak RSS since the reset (training phase; includes what the process
      still held then, e.g. the precomputed features). cpu_peak_rss_process: the whole process's peak,
      precompute included, when the window could not be reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    hwm = _vm_hwm() if _PEAK_RESET[0] else None
    if hwm is not None:
        return hwm, "cpu_peak_rss_train"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_peak_rss_process"


def train(spec: TrainSpec, skip: tuple[int, int], text: dict, feats: Iterable[tuple[int, dict]], device: torch.device,
          ckpt_dir: Path | None = None, log: Callable[[str], None] = print) -> tuple[SkipTrainer, dict]:
    """Train the kept blocks on precomputed features; returns the trainer and the metrics."""
    n_blocks = num_blocks(spec.model)
    kept = range(skip[0], n_blocks - skip[1])
    skipped = [i for i in range(n_blocks) if i not in kept]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gc.collect()  # drop what precompute left (the frozen pipeline) before the training window starts
    reset_peak_memory(device)
    transformer, stack = load_kept_transformer(spec.model, skipped, device, dtype)
    torch.manual_seed(spec.seed)  # LoRA A's init draws from the global RNG: seed it so adapters are reproducible
    trainer = SkipTrainer(transformer, stack, skip, get_mode(spec.mode), spec.optim, device)
    start = 0
    if ckpt_dir is not None and (last := latest_checkpoint(ckpt_dir)) is not None:
        start = trainer.load_checkpoint(last)
        log(f"resumed from {last} at step {start}")
    losses, t0, timed = [], None, 0
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = TrainingCurves(out / "logs", spec.steps, sink=file_sink(out / PROGRESS_FILE))
    bar = progress_bar(spec.steps, "train", enabled=log is print)  # `blockskip train` on a terminal
    bar.update(start)
    for step, f in feats:
        if step < start:
            continue
        if t0 is None and step >= start + 1:  # the first step warms up: time the rest
            t0 = time.perf_counter()
        t_step = time.perf_counter()
        losses.append(trainer.train_step(text, f))
        timed += t0 is not None
        curves.log(trainer.step_count, losses[-1], trainer.opt.param_groups[0]["lr"], time.perf_counter() - t_step,
                   current_memory_bytes(device))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        if spec.checkpoint_every and ckpt_dir is not None and trainer.step_count % spec.checkpoint_every == 0:
            trainer.save_checkpoint(ckpt_dir / f"step-{trainer.step_count:06d}")
        if bar.disable and (step + 1) % max(1, spec.steps // 10) == 0:  # the bar shows it on a terminal
            log(f"  step {step + 1}/{spec.steps} loss {losses[-1]:.4f}")
    elapsed = time.perf_counter() - t0 if t0 is not None else 0.0
    bar.close()
    curves.close(out / "loss_curve.png")
    peak, kind = peak_memory(device)
    metrics = {
        "loss": losses, "steps_per_s": (timed / elapsed) if elapsed > 0 else None, "peak_memory_bytes": peak,
        "peak_memory_kind": kind, "skip": list(skip), "num_blocks": n_blocks, "kept_blocks": [kept.start, kept.stop - 1],
        "skipped_param_fraction": skipped_param_fraction(spec.model, skipped), "mode": spec.mode,
        "resolution": spec.resolution, "steps": spec.steps, "rank": spec.optim.rank, "device": str(device),
        "trainable_params": sum(p.numel() for p in trainer.params),
    }
    return trainer, metrics


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in Path(ckpt_dir).glob("step-*") if (p / "meta.json").is_file())
    return done[-1] if done else None


def skipped_param_fraction(model: str, skipped: list[int]) -> float:
    """Fraction of block parameters (not embedders/head) in the skipped blocks, read from the safetensors header."""
    from ..models.loading import _weight_files

    files = _weight_files(Path(model) / "transformer")
    sizes = _tensor_numels(files)
    n_double = json.loads((Path(model) / "transformer" / "config.json").read_text()).get("num_layers")
    fam = model_family(model)

    def prefix(i: int) -> str:
        if fam == "flux":
            return f"transformer_blocks.{i}." if i < n_double else f"single_transformer_blocks.{i - n_double}."
        return f"transformer_blocks.{i}."

    total = sum(v for k, v in sizes.items() if "transformer_blocks." in k)
    skip = sum(v for k, v in sizes.items() for i in skipped if k.startswith(prefix(i)))
    return skip / total if total else 0.0


def _tensor_numels(files: dict[str, Path]) -> dict[str, int]:
    from safetensors import safe_open

    out = {}
    for path in set(files.values()):
        with safe_open(path, framework="pt") as f:
            for k in f.keys():
                shape = f.get_slice(k).get_shape()
                n = 1
                for s in shape:
                    n *= s
                out[k] = n
    return out


def write_outputs(spec: TrainSpec, family: str, lora_state: dict[str, torch.Tensor], metrics: dict,
                  plan: list[dict]) -> Path:
    """Adapter, plan and metrics; the adapter is written to a temp dir and renamed so it is never half there.
    `lora_state` is the trained LoRA state dict (lora.lora_state_dict of a trainer, or one packed slot)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .adapter_export import export_adapter

    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(plan), out / "plan.parquet")
    tmp = out / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export_adapter(tmp, lora_state, adapter_info(spec, family, tuple(metrics["skip"])))
    shutil.rmtree(out / "adapter", ignore_errors=True)
    tmp.rename(out / "adapter")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return out


def adapter_info(spec: TrainSpec, family: str, skip: tuple[int, int]):
    """The adapter's self-description: only what decides its weights, so every run of a subject writes the same."""
    from .adapter_export import AdapterInfo
    from .stored import model_key

    o = spec.optim
    return AdapterInfo(family=family, base_model=Path(spec.model).resolve().name, base_model_key=model_key(spec.model),
                       prompt=spec.prompt, skip=(int(skip[0]), int(skip[1])), num_blocks=num_blocks(spec.model),
                       mode=spec.mode, steps=spec.steps, resolution=spec.resolution, s_max=spec.s_max, rank=o.rank,
                       alpha=float(o.alpha or o.rank), targets=o.targets, lr=o.lr, seed=spec.seed)


def sample_images(spec: TrainSpec, device: torch.device, prompts: list[str] | None = None) -> list[Path]:
    """Generate images with the stock pipeline + the exported adapter (the same way users will)."""
    pipe = load_pipeline(spec.model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe.load_lora_weights(str(Path(spec.out) / "adapter"))
    size = spec.sample_size or spec.resolution
    out = Path(spec.out) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    extra = {"use_resolution_binning": False} if type(pipe).__name__ == "SanaPipeline" else {}
    extra.update(generation_kwargs(pipe))
    for i, prompt in enumerate(prompts or [spec.prompt] * spec.num_samples):
        g = torch.Generator("cpu").manual_seed(spec.seed + i)
        im = pipe(prompt, num_inference_steps=spec.sample_steps, height=size, width=size, generator=g, **extra).images[0]
        p = out / f"sample_{i:02d}.png"
        im.save(p)
        paths.append(p)
    if paths:
        sample_grid(paths, out.parent / "sample_grid.png")
    return paths


def personalize(spec: TrainSpec, lookup=None, log: Callable[[str], None] = print, features=None) -> dict:
    """Train one subject end to end. `features`: a Store holding this subject's precomputed features
    (`blockskip precompute`); then they are read from it instead of being computed here."""
    device = pick_device(spec.device)
    ckpt = Path(spec.out) / "checkpoints" if spec.checkpoint_every else None
    if features is not None:
        from .stored import train_from_store
        family = model_family(spec.model)
        trainer, metrics, plan = train_from_store(spec, features, spec.subject_id, device, ckpt, log=log)
    else:
        family, images, plan, skip = prepare(spec, lookup, log)
        log(f"plan: {len(plan)} steps, skip n={skip[0]} m={skip[1]}, mode {spec.mode}, device {device}")
        text, feats = precompute(spec, images, plan, skip, device)
        trainer, metrics = train(spec, skip, text, feats, device, ckpt, log)
    write_outputs(spec, family, lora_state_dict(trainer.t), metrics, plan)
    del trainer
    gc.collect()
    if spec.num_samples:
        metrics["samples"] = [str(p) for p in sample_images(spec, device)]
        (Path(spec.out) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


__all__ = ["TrainSpec", "personalize", "prepare", "precompute", "train", "write_outputs", "sample_images", "asdict"]

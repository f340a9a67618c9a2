"""One subject = one Ray Train run (TorchTrainer, one worker), checkpointed into the store.

Ray 2.60 runs the Train V2 API by default (`ray.train.torch.TorchTrainer` is `ray.train.v2...`):
- `RunConfig(storage_path, storage_filesystem, name, failure_config)`: checkpoints are persisted under
  `{storage_path}/{name}/checkpoint_*`. We use `subjects/{id}/checkpoints/` of the store (design section 4)
  through the store's own pyarrow filesystem, so S3 endpoints/credentials are the store's.
- A worker restart (FailureConfig.max_failures) and a later `fit()` with the same storage_path + name (a job
  rerun) both hand the latest persisted checkpoint to `ray.train.get_checkpoint()`; the loop resumes from it.
- Checkpoints hold SkipTrainer.save_checkpoint files (LoRA + AdamW state + RNG, safetensors + JSON) and the
  loss history (JSON). The plan and the features are a pure function of (subject, config, seed), so a resumed
  run ends with the same adapter as an uninterrupted one (tests/distributed/test_jobs.py checks tensor equality).

The worker writes the final artifacts to the store itself (adapter last, so a listed adapter is complete);
the job driver stays the single writer of the status table.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ..method.personalize import TrainSpec, pick_device, prepare, sample_images, write_outputs
from ..method.trainer import OptimConfig
from ..store import Store, put_adapter
from ..store.s3conf import take_failed_uploads
from .checkpoints import check_persisted, load_verified, prune, write_manifest
from .jobspec import JobSpec

# Fault hook for tests and drills: BLOCKSKIP_FAULT="SUBJECT:STEP[:exit|raise]" kills (os._exit) or fails the
# subject's worker just before STEP, only on an attempt that started from scratch (no checkpoint), so the retry or
# the job rerun resumes from the last persisted checkpoint instead of failing again.
FAULT_ENV = "BLOCKSKIP_FAULT"
_STAGE_RE = re.compile(r"\[stage=(\w+)\]")


def StageError(stage: str, message: str) -> RuntimeError:  # noqa: N802 (reads like the exception it makes)
    """An error inside a subject's worker, tagged with the stage it happened in (precompute/train/sample).

    A plain RuntimeError with a "[stage=...]" tag: Ray ships worker errors back by pickling them, and a
    one-argument built-in exception survives that; the driver reads the tag back with `failure_reason`."""
    return RuntimeError(f"[stage={stage}] {message}")


def failure_reason(exc: BaseException) -> tuple[str, str]:
    """(stage, one-line reason) from whatever fit() raised: the worker's StageError if it is in the chain."""
    text = str(exc)
    m = _STAGE_RE.search(text)
    stage = m.group(1) if m else "train"
    if m:
        line = text[m.start():].splitlines()[0]
        return stage, line[m.end() - m.start():].strip()[:500]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt): ", ln)]
    died = [ln for ln in lines if "died" in ln or "exited" in ln]
    pick = (died or errors or lines or [type(exc).__name__])[0 if died else -1]
    return stage, pick[:500]


def subject_train_spec(job: JobSpec, model_dir: str, subject_id: str, prompt: str, images: str,
                       skip: tuple[int, int] | None, out: str) -> TrainSpec:
    t = job.train
    optim = OptimConfig(rank=t.rank, alpha=t.alpha, targets=t.lora_targets, lr=t.lr, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                        guidance=t.guidance, gradient_checkpointing=t.gradient_checkpointing,
                        mixed_precision=t.mixed_precision)
    return TrainSpec(model=model_dir, images=images, prompt=prompt, out=out, subject_id=subject_id,
                     skip=skip, skip_ratio=None if skip is not None else t.skip_ratio, mode=t.mode, steps=t.steps,
                     resolution=t.resolution, s_max=t.s_max, seed=t.seed, max_text_tokens=t.max_text_tokens,
                     checkpoint_every=t.checkpoint_every, num_samples=job.samples.num,
                     sample_steps=job.samples.steps, sample_size=job.samples.size, device="auto", optim=optim,
                     max_image_pixels=job.max_image_pixels)


def _materialize_images(images: Any, dest: Path) -> str:
    """A local directory of the subject's images: a local dir as is; a list of paths / s3 URIs (catalog.Subject)
    copied into dest with an index prefix, so the sorted directory keeps the catalog's order."""
    if isinstance(images, str):
        return images
    dest.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(images):
        parent, _, base = src.rstrip("/").rpartition("/")
        if src.startswith("s3://"):
            (dest / f"{i:03d}-{base}").write_bytes(Store.open(parent).read_bytes(base))
        else:
            shutil.copyfile(src, dest / f"{i:03d}-{Path(src).name}")
    return str(dest)


def _features(spec: TrainSpec, store: Store, images, plan, skip, device, start: int):
    """(text, iterator of (step, features)) from `start` on: the committed set that `blockskip precompute` wrote
    (checked against this spec by method/stored.read_features), else computed here from the frozen model with
    the same function as `blockskip train`."""
    from ..method.stored import read_features, spec_meta
    from ..store import is_committed

    if is_committed(store, spec.subject_id):
        from ..store.features import FeatureDamage, invalidate_features
        try:
            text, _, feats = read_features(store, spec.subject_id, expect=spec_meta(spec, skip))
        except FeatureDamage as e:
            invalidate_features(store, spec.subject_id)
            raise FeatureDamage(f"{e}; the feature set was invalidated and the next run rebuilds it") from None
        return text, _damage_checked(store, spec.subject_id, ((s, f) for s, f in feats if s >= start))
    from ..method.personalize import precompute
    text, feats = precompute(spec, images, plan[start:], skip, device, progress=False)
    return text, iter(feats)


def _damage_checked(store: Store, subject_id: str, feats):
    """Pass the features through; a damaged committed set (checksum mismatch found while reading) is invalidated
    so the next run's precompute rebuilds it instead of skipping it as committed, then the error goes on."""
    from ..store.features import FeatureDamage, invalidate_features
    try:
        yield from feats
    except FeatureDamage as e:
        invalidate_features(store, subject_id)
        raise FeatureDamage(f"{e}; the feature set was invalidated and the next run rebuilds it") from None


def train_loop(cfg: dict[str, Any]) -> None:
    """The Ray Train worker: prepare -> features -> resume -> train (checkpoint + report) -> adapter -> samples."""
    import torch

    from ..method.curves import PROGRESS_FILE, TrainingCurves, current_memory_bytes
    from ..method.personalize import num_blocks, peak_memory, reset_peak_memory, skipped_param_fraction
    from ..models.loading import load_kept_transformer
    from ..method.modes import get_mode
    from ..method.trainer import SkipTrainer

    store: Store = cfg["store"]
    sid = cfg["subject_id"]
    t_start = time.perf_counter()

    def log(msg: str) -> None:  # forwarded to the driver's console by Ray
        print(f"[{cfg['job_id']}] {sid}: {msg} (+{time.perf_counter() - t_start:.1f} s)", flush=True)

    work = Path(tempfile.mkdtemp(prefix=f"blockskip-{sid}-"))
    try:
        spec = TrainSpec(**{**cfg["spec"], "out": str(work / "out"), "optim": OptimConfig(**cfg["spec"]["optim"]),
                            "skip": tuple(cfg["spec"]["skip"]) if cfg["spec"]["skip"] is not None else None})
        try:
            spec.images = _materialize_images(cfg["images"], work / "images")
            family, images, plan, skip = prepare(spec, log=lambda m: None)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise StageError("precompute", f"bad subject data: {e}") from None
        device = pick_device(spec.device)
        start, losses, resumed = 0, [], None
        ckpt = ray.train.get_checkpoint()
        n_blocks = num_blocks(spec.model)
        kept = range(skip[0], n_blocks - skip[1])
        skipped = [i for i in range(n_blocks) if i not in kept]
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            # LoRA A is drawn from the global RNG: seed it so the adapter is a pure function of (subject, config,
            # seed) whichever process (first attempt, retry, rerun) trains it.
            torch.manual_seed(spec.seed)
            transformer, stack = load_kept_transformer(spec.model, skipped, device, dtype)
            trainer = SkipTrainer(transformer, stack, skip, get_mode(spec.mode), spec.optim, device)
            if ckpt is not None:
                def load(d: str) -> int:
                    nonlocal losses
                    step = trainer.load_checkpoint(d)
                    losses = json.loads((Path(d) / "losses.json").read_text())[:step]
                    return step

                # verified against its manifest; a damaged latest falls back to the newest earlier good one
                start = resumed = load_verified(ckpt, load, log)
        except Exception as e:
            raise StageError("train", f"{type(e).__name__}: {e}") from e
        try:
            text, feats = _features(spec, store, images, plan, skip, device, start)
        except Exception as e:
            raise StageError("precompute", f"{type(e).__name__}: {e}") from e
        log(f"{'resuming at step ' + str(start) if start else 'starting'}: {len(plan)} steps, skip n={skip[0]} "
            f"m={skip[1]}, device {device}")
        reset_peak_memory(device)  # metrics report the training phase's own peak (features + kept blocks held)
        fault = cfg.get("fault")
        t0, timed = None, 0
        curves = TrainingCurves(Path(spec.out) / "logs", spec.steps,  # TensorBoard + progress for `blockskip status`
                                sink=lambda p: store.write_json(f"subjects/{sid}/{PROGRESS_FILE}", p))
        try:
            for step, f in feats:
                if fault and ckpt is None and step == fault[0]:
                    if fault[1] == "exit":
                        os._exit(17)  # a hard crash: the process vanishes mid-training
                    raise RuntimeError(f"injected fault at step {step}")
                if t0 is None and step >= start + 1:
                    t0 = time.perf_counter()
                t_step = time.perf_counter()
                losses.append(trainer.train_step(text, f))
                timed += t0 is not None
                curves.log(trainer.step_count, losses[-1], trainer.opt.param_groups[0]["lr"],
                           time.perf_counter() - t_step, current_memory_bytes(device))
                last = trainer.step_count == spec.steps
                if last or (spec.checkpoint_every and trainer.step_count % spec.checkpoint_every == 0):
                    with tempfile.TemporaryDirectory() as d:
                        trainer.save_checkpoint(d)
                        (Path(d) / "losses.json").write_text(json.dumps(losses))
                        write_manifest(d, trainer.step_count)  # last: sha256 of every file, checked at resume
                        take_failed_uploads()  # forget failures of earlier uploads in this process
                        ray.train.report({"step": trainer.step_count, "loss": losses[-1]},
                                         checkpoint=Checkpoint.from_directory(d))
                        check_persisted(trainer.step_count)
        except Exception as e:
            raise StageError("train", f"{type(e).__name__}: {e}") from e
        elapsed = time.perf_counter() - t0 if t0 is not None else 0.0
        curves.close(Path(spec.out) / "loss_curve.png")
        peak, kind = peak_memory(device)
        metrics = {
            "subject_id": sid, "loss": losses, "steps_per_s": (timed / elapsed) if elapsed > 0 else None,
            "peak_memory_bytes": peak, "peak_memory_kind": kind, "skip": list(skip), "num_blocks": n_blocks,
            "kept_blocks": [kept.start, kept.stop - 1], "resumed_from_step": resumed,
            "skipped_param_fraction": skipped_param_fraction(spec.model, skipped), "mode": spec.mode,
            "resolution": spec.resolution, "steps": spec.steps, "rank": spec.optim.rank, "device": str(device),
            "trainable_params": sum(p.numel() for p in trainer.params), "job_id": cfg["job_id"],
        }
        log(f"trained: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        from ..method.lora import lora_state_dict

        out = write_outputs(spec, family, lora_state_dict(trainer.t), metrics, plan)
        del trainer, transformer
        try:
            # eval first: sample_images names its files sample_XX.png, the eval ones are renamed eval_XX.png
            samples = _eval_images(spec, device, cfg["eval_prompts"]) if cfg["eval_prompts"] else []
            samples += sample_images(spec, device) if spec.num_samples else []
        except Exception as e:
            raise StageError("sample", f"{type(e).__name__}: {e}") from e
        log(f"{len(samples)} sample(s) rendered")
        _upload(store, sid, out, samples, metrics)
        log("adapter, metrics and samples written to the store")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _eval_images(spec: TrainSpec, device, prompts: list[str]) -> list[Path]:
    paths = sample_images(spec, device, prompts=prompts)
    out = []
    for i, p in enumerate(paths):
        q = p.with_name(f"eval_{i:02d}.png")
        p.replace(q)
        out.append(q)
    return out


def _upload(store: Store, sid: str, out: Path, samples: list[Path], metrics: dict) -> None:
    """Samples, plan and metrics first, the adapter last (its weights file marks the subject as complete)."""
    prefix = f"subjects/{sid}"
    store.delete_prefix(f"{prefix}/samples")
    for p in samples:
        store.write_bytes(f"{prefix}/samples/{p.name}", p.read_bytes())
    store.write_bytes(f"{prefix}/plan.parquet", (out / "plan.parquet").read_bytes())
    store.delete_prefix(f"{prefix}/logs")  # training curves: TensorBoard events, loss PNG, sample grid
    for p in sorted([*(out / "logs").rglob("*"), out / "loss_curve.png", out / "sample_grid.png"]):
        if p.is_file():
            store.write_bytes(f"{prefix}/{p.relative_to(out).as_posix()}", p.read_bytes())
    metrics = {**metrics, "samples": [store.url(f"{prefix}/samples/{p.name}") for p in samples],
               "adapter": store.url(f"{prefix}/adapter")}
    store.write_json(f"{prefix}/metrics.json", metrics)
    put_adapter(store, sid, out / "adapter")


def parse_fault(subject_id: str) -> tuple[int, str] | None:
    raw = os.environ.get(FAULT_ENV, "")
    for item in filter(None, (x.strip() for x in raw.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or not parts[1].isdigit():
            raise ValueError(f"{FAULT_ENV}={raw!r}: expected SUBJECT:STEP[:exit|raise]")
        if parts[0] == subject_id:
            return int(parts[1]), (parts[2] if len(parts) == 3 else "exit")
    return None


def make_trainer(job: JobSpec, store: Store, subject_id: str, cfg: dict[str, Any]) -> TorchTrainer:
    r = job.ray
    use_gpu = r.gpus_per_subject > 0
    res: dict[str, float] = {"CPU": r.cpus_per_subject}
    if use_gpu:
        res["GPU"] = r.gpus_per_subject
    return TorchTrainer(
        train_loop, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=res),
        run_config=RunConfig(storage_path=store.fs_path(f"subjects/{subject_id}/checkpoints"),
                             storage_filesystem=store.filesystem, name=f"{job.job_id}-{subject_id}",
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             # the last N (train.keep_checkpoints) stay: the latest, and earlier ones that a
                             # damaged latest falls back to; Ray deletes the older ones as new ones persist
                             checkpoint_config=CheckpointConfig(num_to_keep=job.train.keep_checkpoints)),
    )


def fit_subject(job: JobSpec, store: Store, subject_id: str, spec: TrainSpec, images: Any,
                eval_prompts: list[str]) -> dict:
    """Run the subject's Ray Train run to completion; returns its metrics.json. Raises on failure."""
    cfg = {"store": store, "subject_id": subject_id, "job_id": job.job_id, "images": images,
           "eval_prompts": eval_prompts if job.samples.eval else [], "fault": parse_fault(subject_id),
           "spec": {**asdict(spec), "optim": asdict(spec.optim)}}
    make_trainer(job, store, subject_id, cfg).fit()
    prune(store, f"subjects/{subject_id}/checkpoints/{job.job_id}-{subject_id}", job.train.keep_checkpoints)
    return store.read_json(f"subjects/{subject_id}/metrics.json")


__all__ = ["fit_subject", "train_loop", "make_trainer", "failure_reason", "StageError", "subject_train_spec",
           "FAULT_ENV", "parse_fault"]

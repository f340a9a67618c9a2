"""Long-lived training workers (design section 7): one Ray Train run for the whole catalog.

`ray.workers` = N > 0 in the job: a TorchTrainer with N workers (one per GPU with `gpus_per_subject` > 0).
Each worker loads the frozen kept blocks once, then takes subjects from a queue actor until none are left,
training `ray.pack` of them per step (method/packed.run_packed: a finished or failed subject frees its slot
for the next). Everything the per-subject path gives stays:
- artifacts: the worker writes plan, metrics, samples and the adapter (last) to the store, as training.py does;
- status: workers only report to the queue; the driver (single writer of the status table) drains it;
- checkpoints: every `checkpoint_every` steps, `subjects/{id}/checkpoints/pool-{job_id}/` (PackedTrainer's files, the
  SkipTrainer format, + losses.json + a sha256 manifest); a subject resumes from it exactly (its features, plan
  and LoRA init are pure functions of the subject and the config); a damaged one is never resumed from: the
  subject restarts from step 0 (same adapter) and its metrics.json says why (`checkpoint_rejected`);
- failure isolation: bad data or a non-finite loss fails that subject with its reason; the worker goes on;
- a killed worker: Ray Train restarts the worker group (`max_failures`); every worker first hands its
  leased subjects back to the queue, and they resume from their checkpoints; a rerun of the job trains only
  the subjects without an adapter (jobs.run_job decides, as for the per-subject path).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import ray
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ..store import Store
from .checkpoints import MANIFEST, verify, write_manifest
from .jobspec import JobSpec

_CKPT_FILES = ("state.safetensors", "meta.json", "losses.json")  # a pool checkpoint, beside its manifest



def ckpt_prefix(sid: str, job_id: str) -> str:
    """Per subject and job (like the per-subject path's Ray Train run name): another job never resumes it."""
    return f"subjects/{sid}/checkpoints/pool-{job_id}"


@ray.remote(num_cpus=0)
class SubjectQueue:
    """Subjects to train, leases by worker rank, and the events the driver has not read yet."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.pending = list(items)
        self.leased: dict[str, tuple[int, dict]] = {}
        self.events: list[dict[str, Any]] = []

    def start(self, rank: int) -> int:
        """A worker (re)starts: what it had leased goes back to the front of the queue."""
        back = [item for sid, (r, item) in self.leased.items() if r == rank]
        for item in back:
            del self.leased[item["id"]]
        self.pending[:0] = back
        return len(back)

    def take(self, rank: int) -> dict[str, Any] | None:
        if not self.pending:
            return None
        item = self.pending.pop(0)
        self.leased[item["id"]] = (rank, item)
        self.events.append({"id": item["id"], "kind": "running"})
        return item

    def finish(self, sid: str, kind: str, info: Any) -> None:
        self.leased.pop(sid, None)
        self.events.append({"id": sid, "kind": kind, "info": info})

    def drain(self) -> list[dict[str, Any]]:
        out, self.events = self.events, []
        return out

    def unfinished(self) -> list[str]:
        return [i["id"] for i in self.pending] + list(self.leased)


def pool_loop(cfg: dict[str, Any]) -> None:
    """A pool worker: the frozen model once, then subjects K at a time until the queue is empty."""
    import torch

    from ..method.modes import get_mode
    from ..method.packed import PackedSubject, PackedTrainer, run_packed
    from ..method.personalize import TrainSpec, num_blocks, pick_device
    from ..method.trainer import OptimConfig
    from ..models.loading import load_kept_transformer

    queue, store = cfg["queue"], cfg["store"]
    rank = ray.train.get_context().get_world_rank()
    ray.get(queue.start.remote(rank))  # hand back what this rank held before a restart
    base = TrainSpec(**{**cfg["spec"], "optim": OptimConfig(**cfg["spec"]["optim"]), "skip": tuple(cfg["spec"]["skip"])})
    device = pick_device(base.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_blocks = num_blocks(base.model)
    kept = range(base.skip[0], n_blocks - base.skip[1])
    t, stack = load_kept_transformer(base.model, [i for i in range(n_blocks) if i not in kept], device, dtype)
    trainer = PackedTrainer(t, stack, base.skip, get_mode(base.mode), base.optim, cfg["pack"], device)
    work = Path(tempfile.mkdtemp(prefix=f"blockskip-pool-{rank}-"))
    state: dict[str, dict[str, Any]] = {}
    packed_step = trainer.step

    def timed_step(batch):  # each subject's share of the packed steps' time (metrics: train_step_s)
        t0 = time.perf_counter()
        out = packed_step(batch)
        share = (time.perf_counter() - t0) / len(batch)
        for n in batch:
            if n in state:
                state[n]["step_s"] += share
        return out

    trainer.step = timed_step
    fault = cfg.get("fault") or {}

    def subjects():
        while (item := ray.get(queue.take.remote(rank))) is not None:
            sid = item["id"]
            try:
                spec, plan, text, feats, ckpt, losses, rejected = _open_subject(cfg, base, store, item, work / sid)
            except Exception as e:
                ray.get(queue.finish.remote(sid, "failed", ["precompute", f"{type(e).__name__}: {e}"[:500]]))
                continue
            state[sid] = {"spec": spec, "plan": plan, "losses": losses, "resumed": None if ckpt is None else len(losses),
                          "item": item, "t0": time.perf_counter(), "step_s": 0.0, "fault": fault.get(sid) if ckpt is None else None,
                          "checkpoint_rejected": rejected}
            yield PackedSubject(sid, spec.seed, text, feats, ckpt)

    def on_step(sid: str, step: int, loss: float, tr: PackedTrainer) -> None:
        st = state[sid]
        f = st["fault"]
        if f and step + 1 == f[0]:
            if f[1] == "exit":
                os._exit(17)  # a hard crash of the whole worker (tests: the restart path)
            raise RuntimeError(f"injected fault at step {step + 1}")
        st["losses"].append(loss)
        every = st["spec"].checkpoint_every
        if every and tr.steps(sid) % every == 0 and tr.steps(sid) < st["spec"].steps:
            _save_checkpoint(store, tr, sid, cfg["job_id"], st["losses"], work / sid)

    def on_done(sid: str, tr: PackedTrainer) -> None:
        st = state.pop(sid)
        metrics = _finish_subject(cfg, store, tr, sid, st, work / sid, device)
        ray.get(queue.finish.remote(sid, "succeeded", metrics))

    def on_fail(sid: str, why: str) -> None:
        state.pop(sid, None)
        ray.get(queue.finish.remote(sid, "failed", ["train", why[:500]]))

    try:
        run_packed(trainer, subjects(), on_done=on_done, on_fail=on_fail, on_step=on_step)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _open_subject(cfg, base, store: Store, item: dict, work: Path):
    """(spec, plan, text, feats iterator, checkpoint dir or None, losses so far) for one subject."""
    from dataclasses import replace

    from ..method.personalize import prepare
    from .training import _features, _materialize_images

    sid = item["id"]
    spec = replace(base, subject_id=sid, prompt=item["prompt"], out=str(work / "out"))
    spec.images = _materialize_images(item["images"], work / "images")
    _, images, plan, skip = prepare(spec, log=lambda m: None)
    ckpt, losses, rejected = _load_checkpoint(store, sid, cfg["job_id"], work / "ckpt")
    start = len(losses)
    text, feats = _features(spec, store, images, plan, skip, _device_of(spec), start)
    return spec, plan, text, feats, ckpt, losses, rejected


def _device_of(spec):
    from ..method.personalize import pick_device

    return pick_device(spec.device)


def _save_checkpoint(store: Store, tr, sid: str, job_id: str, losses: list[float], work: Path) -> None:
    """PackedTrainer's checkpoint + losses into the store; `latest.json` last, so it only names complete ones."""
    step = tr.steps(sid)
    d = work / f"ckpt-out-{step}"
    tr.save_checkpoint(sid, d)
    (d / "losses.json").write_text(json.dumps(losses))
    write_manifest(d, step)  # sha256 of every file, verified at resume (as the per-subject path does)
    prefix = f"{ckpt_prefix(sid, job_id)}/step-{step:06d}"
    for name in (*_CKPT_FILES, MANIFEST):
        store.write_bytes(f"{prefix}/{name}", (d / name).read_bytes())
    store.write_json(f"{ckpt_prefix(sid, job_id)}/latest.json", {"step": step, "prefix": prefix})
    for old in {k.rsplit("/", 2)[-2] for k in store.list(f"{ckpt_prefix(sid, job_id)}") if "/step-" in k}:
        if old != f"step-{step:06d}":  # only the latest is ever resumed from: keep the footprint at one
            store.delete_prefix(f"{ckpt_prefix(sid, job_id)}/{old}")
    shutil.rmtree(d, ignore_errors=True)


def _load_checkpoint(store: Store, sid: str, job_id: str, dest: Path
                     ) -> tuple[Path | None, list[float], str | None]:
    """(checkpoint dir, losses so far, None), or (None, [], why) when there is none or it is damaged: a
    damaged checkpoint (sha256 mismatch, a file missing) is never resumed from; the subject restarts from
    step 0, which gives the same adapter (training is deterministic), and its metrics say why."""
    try:
        latest = store.read_json(f"{ckpt_prefix(sid, job_id)}/latest.json")
        prefix, step = str(latest["prefix"]), int(latest["step"])
    except FileNotFoundError:
        return None, [], None
    except (ValueError, KeyError, TypeError) as e:
        return None, [], f"checkpoint pointer {ckpt_prefix(sid, job_id)}/latest.json is unreadable ({e}); restarted from step 0"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        for name in (*_CKPT_FILES, MANIFEST):
            (dest / name).write_bytes(store.read_bytes(f"{prefix}/{name}"))
        saved, why = verify(dest)
        if why is None and saved != step:
            why = f"manifest step {saved} != latest.json step {step}"
    except FileNotFoundError as e:
        why = f"missing file ({e})"
    if why is not None:
        shutil.rmtree(dest, ignore_errors=True)
        return None, [], f"checkpoint {prefix} is damaged ({why}); restarted from step 0"
    losses = json.loads((dest / "losses.json").read_text())[:step]
    return dest, losses, None


def _finish_subject(cfg, store: Store, tr, sid: str, st: dict, work: Path, device) -> dict:
    """Adapter, plan, metrics and samples of a finished subject, as training.train_loop writes them."""
    from ..method.personalize import sample_images, write_outputs
    from .training import _eval_images, _upload

    spec, losses = st["spec"], st["losses"]
    metrics = {"subject_id": sid, "loss": losses, "steps": spec.steps, "skip": list(spec.skip),
               "resumed_from_step": st["resumed"], "mode": spec.mode, "resolution": spec.resolution,
               "rank": spec.optim.rank, "device": str(device), "job_id": cfg["job_id"], "pool": True,
               "pack": tr.K, "wall_s": time.perf_counter() - st["t0"], "train_step_s": st["step_s"],
               **({"checkpoint_rejected": st["checkpoint_rejected"]} if st["checkpoint_rejected"] else {})}
    out = write_outputs(spec, cfg["family"], tr.lora_state(sid), metrics, st["plan"])
    eval_prompts = st["item"].get("eval_prompts") or []
    samples = _eval_images(spec, device, eval_prompts) if cfg["eval"] and eval_prompts else []
    samples += sample_images(spec, device) if spec.num_samples else []
    _upload(store, sid, out, samples, metrics)
    store.delete_prefix(ckpt_prefix(sid, cfg["job_id"]))
    shutil.rmtree(work, ignore_errors=True)
    return metrics


def run_pool(job: JobSpec, store: Store, model_dir: str, subjects: list, skip: tuple[int, int],
             on_event: Callable[[str, str, Any], None], log: Callable[[str], None]) -> None:
    """Train `subjects` on `job.ray.workers` long-lived workers; `on_event(sid, kind, info)` runs in the driver
    for every state change (kind: running | succeeded (info: metrics) | failed (info: [stage, reason]))."""
    from ..models.loading import model_family
    from .training import parse_fault, subject_train_spec

    r = job.ray
    spec = subject_train_spec(job, model_dir, "pool", "", "", skip, out="")
    queue = SubjectQueue.remote([s.to_json() for s in subjects])
    faults = {s.id: f for s in subjects if (f := parse_fault(s.id)) is not None}
    cfg = {"queue": queue, "store": store, "job_id": job.job_id, "pack": r.pack, "family": model_family(model_dir),
           "eval": job.samples.eval, "fault": faults, "spec": {**asdict(spec), "optim": asdict(spec.optim)}}
    use_gpu = r.gpus_per_subject > 0
    res: dict[str, float] = {"CPU": r.cpus_per_subject, **({"GPU": 1.0} if use_gpu else {})}
    trainer = TorchTrainer(
        pool_loop, train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=use_gpu, resources_per_worker=res),
        run_config=RunConfig(storage_path=store.fs_path(f"jobs/{job.job_id}/pool"), storage_filesystem=store.filesystem,
                             name=f"{job.job_id}-pool-{uuid.uuid4().hex[:8]}",
                             failure_config=FailureConfig(max_failures=r.max_failures)))
    error: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # reported below, per unfinished subject
            error.append(e)

    th = threading.Thread(target=fit, name="pool-fit", daemon=True)
    th.start()
    log(f"[{job.job_id}] pool: {r.workers} worker(s), {r.pack} subject(s) per step, {len(subjects)} subject(s)")
    while True:
        alive = th.is_alive()
        for ev in ray.get(queue.drain.remote()):
            on_event(ev["id"], ev["kind"], ev.get("info"))
        if not alive:
            break
        time.sleep(0.5)
    left = ray.get(queue.unfinished.remote())
    if left:
        from .training import failure_reason
        why = failure_reason(error[0])[1] if error else "the pool ended before training it"
        for sid in left:
            on_event(sid, "failed", ["train", why])
    ray.kill(queue)


__all__ = ["run_pool", "pool_loop", "SubjectQueue"]

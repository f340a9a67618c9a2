"""The Ray Data precompute pipeline: plan rows of many subjects -> feature actors -> shards in the store.

    driver: catalog -> per subject: committed with the same meta? skip : (validate images, build plan)
    Dataset of plan rows (subject, step, image index, crop box, sigma, noise seed, ...), ordered (subject, step)
      -> map_batches(FeatureActor, compute=ActorPoolStrategy(size=C), num_gpus=G)   the frozen pipeline loaded once per actor;
                                                                 images read (and validated) in the actor
      -> driver: iter_rows() in order (preserve_order) -> write_features per subject -> _COMMITTED

Why the driver writes: FeatureWriter needs a subject's steps in increasing order and shards are cut by size,
so shard boundaries and bytes must not depend on how rows were batched or which actor computed them. With
preserve_order the driver sees rows in plan order whatever the actor scheduling, and each row's features
depend only on the row (FeatureComputer.step is per row, deterministic), so a rerun is byte-identical. The
driver only moves bytes (features cross Ray as safetensors blobs, never pickled tensors); the compute runs
in the actors. On S3 the driver's writes are a few large PUTs per subject.

Idempotent: a subject whose committed meta equals this run's is skipped (no write at all); a subject with
an uncommitted set (a crash part-way) is recomputed from scratch, which gives the same bytes as a run that
never crashed; a committed set for another configuration is an error unless overwrite=True.
"""
from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import ray
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..method.catalog import Subject, open_images, subject_from_json
from ..method.images import DEFAULT_MAX_PIXELS
from ..store.features import committed_damage, invalidate_features
from ..method.modes import get_mode
from ..method.sampling import PlanConfig, build_plan
from ..method.stored import make_meta, model_key, stored_meta, write_features
from ..models.loading import model_family, pixel_multiple
from ..store import Store


@dataclass(frozen=True)
class PrecomputeConfig:
    model: str
    skip: tuple[int, int]
    mode: str = "blockskip"
    steps: int = 500
    resolution: int = 256
    s_max: int | None = None
    seed: int = 0
    max_text_tokens: int = 512
    guidance: float = 3.5
    feature_dtype: str = "bf16"
    num_gpus: float = 0.0  # per actor; > 0 computes on CUDA in bf16
    concurrency: int = 1  # actors
    batch_size: int = 4
    shard_max_bytes: int = 256 * 2**20
    endpoint_url: str | None = None  # for s3:// image URIs
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS  # per-image pixel budget, checked from the header

    @property
    def compute_dtype(self) -> str:
        return "bf16" if self.num_gpus > 0 else "fp32"


class FeatureActor:
    """Ray Data callable class: the frozen pipeline is loaded once per actor, then batches of plan rows."""

    def __init__(self, cfg: PrecomputeConfig):
        from ..method.features import FeatureComputer
        from ..models.loading import load_pipeline

        self.cfg = cfg
        device = torch.device("cuda" if cfg.num_gpus > 0 else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        # The VAE, the text encoders and every block are needed: the leading state and the trailing delta
        # come from running the whole frozen stack on each step's input.
        pipe = load_pipeline(cfg.model, device, dtype)
        self.fc = FeatureComputer(pipe, cfg.skip, get_mode(cfg.mode), cfg.max_text_tokens, cfg.guidance)
        self._subject: tuple[str, list, dict] | None = None  # (id, images, text) of the last subject seen

    def _subject_state(self, row: dict) -> tuple[list, dict]:
        sid = row["subject_id"]
        if self._subject is None or self._subject[0] != sid:  # rows come grouped by subject: cache one
            subject = subject_from_json(json.loads(row["subject_json"]))
            images = open_images(subject, self.cfg.endpoint_url, self.cfg.max_image_pixels)
            self._subject = (sid, images, self.fc.text(subject.prompt))
        return self._subject[1], self._subject[2]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = len(batch["subject_id"])
        feats, texts = [], []
        for i in range(n):
            row = {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in batch.items()}
            images, text = self._subject_state(row)
            f = self.fc.step(images[int(row["image_index"])], row, text)
            feats.append(st_save({k: v.contiguous() for k, v in f.items()}))
            texts.append(st_save({k: v.contiguous() for k, v in text.items()}) if row["step"] == 0 else b"")
        return {"subject_id": batch["subject_id"], "step": batch["step"], "feats": feats, "text": texts}


def subject_meta(cfg: PrecomputeConfig, subject: Subject, key: str) -> dict[str, Any]:
    return make_meta(model=cfg.model, family=model_family(cfg.model), skip=cfg.skip, mode=cfg.mode,
                     resolution=cfg.resolution, s_max=cfg.s_max, steps=cfg.steps, seed=cfg.seed,
                     max_text_tokens=cfg.max_text_tokens, guidance=cfg.guidance, prompt=subject.prompt,
                     feature_dtype=cfg.feature_dtype, compute_dtype=cfg.compute_dtype, model_key_=key)


def subject_plan(cfg: PrecomputeConfig, subject: Subject) -> list[dict]:
    """The plan exactly as `blockskip train` builds it (same PlanConfig, same pixel multiple)."""
    multiple = pixel_multiple(cfg.model)  # also validates the model directory
    sizes = [im.size for im in open_images(subject, cfg.endpoint_url, cfg.max_image_pixels)]
    return build_plan(subject.id, sizes, PlanConfig(steps=cfg.steps, s_min=cfg.resolution, s_max=cfg.s_max,
                                                    sampling=get_mode(cfg.mode).sampling, seed=cfg.seed), multiple)


def _decode(b: bytes) -> dict[str, torch.Tensor]:
    return st_load(bytes(b))


def run_precompute(store: Store, subjects: list[Subject], cfg: PrecomputeConfig, *, overwrite: bool = False,
                   overwrite_hint: str = "pass --overwrite", on_step: Callable[[str, int], None] | None = None,
                   log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> dict[str, dict]:
    """Precompute and commit every subject's features; returns {subject_id: {"state", ...}}.

    state: "skipped" (already committed for this configuration), "succeeded", or "failed" (with "error": bad
    images or plan; such subjects never reach the actors). `on_step(subject_id, step)` is called before each
    step is written (a test hook: raising there simulates a crash part-way through a subject).

    A committed set whose marker or index is damaged fails its subject only, naming the object, and is
    invalidated so the next run rebuilds it (with `overwrite` it is rebuilt in this run). `overwrite_hint` is
    how the caller's user asks for overwrite (`blockskip precompute --overwrite`, a job's `overwrite=true`)."""
    get_mode(cfg.mode)
    key = model_key(cfg.model)
    results: dict[str, dict] = {}
    rows: list[dict] = []
    plans: dict[str, list[dict]] = {}
    metas: dict[str, dict] = {}
    for s in subjects:
        meta = subject_meta(cfg, s, key)
        damage = committed_damage(store, s.id)
        if damage is not None:
            invalidate_features(store, s.id)  # never trusted again; the set is rebuilt from scratch
            if not overwrite:
                why = f"{damage}; the feature set was invalidated and the next run rebuilds it"
                results[s.id] = {"state": "failed", "error": why}
                log(f"precompute {s.id}: failed: {why}")
                continue
            log(f"precompute {s.id}: {damage}; rebuilding it (overwrite)")
        old = stored_meta(store, s.id)
        if old is not None and old == meta:
            results[s.id] = {"state": "skipped", "reason": "features already committed for this configuration"}
            log(f"precompute {s.id}: already committed for this configuration, skipped")
            continue
        if old is not None and not overwrite:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            raise ValueError(f"subject {s.id}: committed features in {store.uri} were computed for another "
                             f"configuration (differs in {', '.join(diff)}); {overwrite_hint} to recompute them")
        try:
            plan = subject_plan(cfg, s)
        except (ValueError, FileNotFoundError) as e:
            results[s.id] = {"state": "failed", "error": str(e)}
            log(f"precompute {s.id}: failed: {e}")
            continue
        plans[s.id], metas[s.id] = plan, meta
        sj = json.dumps(s.to_json())
        rows.extend({"subject_id": s.id, "subject_json": sj, **r} for r in plan)
    if not rows:
        return results

    ctx = ray.data.DataContext.get_current()
    previous = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # the writer needs each subject's steps in order
    try:
        _compute_and_write(store, rows, plans, metas, cfg, results, on_step, log)
    finally:  # do not leak the setting into the caller's other datasets
        ctx.execution_options.preserve_order = previous
    missing = [sid for sid in plans if sid not in results]
    if missing:  # cannot happen unless Ray dropped rows; never report success for them
        raise RuntimeError(f"precompute returned no features for {missing}")
    return results


def _compute_and_write(store: Store, rows: list[dict], plans: dict[str, list[dict]], metas: dict[str, dict],
                       cfg: PrecomputeConfig, results: dict[str, dict], on_step: Callable[[str, int], None] | None,
                       log: Callable[[str], None]) -> None:
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // cfg.batch_size, 64)))
    ds = ds.map_batches(FeatureActor, fn_constructor_args=(cfg,), batch_size=cfg.batch_size,
                        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency), num_gpus=cfg.num_gpus or None,
                        num_cpus=None if cfg.num_gpus else 1, batch_format="numpy")
    stream: Iterator[dict] = iter(ds.iter_rows())
    for sid, group in itertools.groupby(stream, key=lambda r: r["subject_id"]):
        t0 = time.perf_counter()
        first = next(group)
        text = _decode(first["text"])

        def feats(first=first, group=group, sid=sid) -> Iterator[tuple[int, dict]]:
            for r in itertools.chain([first], group):
                if on_step is not None:
                    on_step(sid, int(r["step"]))
                yield int(r["step"]), _decode(r["feats"])

        marker = write_features(store, sid, text, feats(), plans[sid], metas[sid],
                                shard_max_bytes=cfg.shard_max_bytes)
        dt = time.perf_counter() - t0
        results[sid] = {"state": "succeeded", "steps": marker["num_steps"], "shards": marker["num_shards"],
                        "seconds": dt}
        log(f"precompute {sid}: {marker['num_steps']} steps, {marker['num_shards']} shard(s), "
            f"{cfg.feature_dtype}, committed ({dt:.1f} s)")

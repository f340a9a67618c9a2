"""Features in the store: write a subject's precomputed set, read it back, train from it (no ray here).

Layout (design section 4, plus the per-subject text conditioning):

    subjects/{id}/plan.parquet                  the plan the features were computed for
    subjects/{id}/features/shard-*.safetensors  per-step tensors, through FeatureWriter (feature dtype)
    subjects/{id}/features/text.safetensors     prompt_embeds + pooled (FLUX) / prompt_mask (SANA), fp32
    subjects/{id}/features/index.parquet
    subjects/{id}/features/_COMMITTED           last; its "extra" holds {"meta", "text_sha256", "plan_sha256"}

The text conditioning is constant per subject, so it is stored once, always fp32 (it is small: 512x4096 fp32
is 8 MiB at FLUX scale, vs ~3 MiB of features per step), and written after the shards and before the index
and `_COMMITTED` (FeatureWriter wipes the features/ prefix when it starts, so it cannot go earlier). Its
sha256 and the plan's are recorded in the commit marker, so a reader never pairs a committed feature set
with a text file or plan from another run. `meta` says what the features were computed for; a reader given
`expect` refuses a set whose meta differs, naming the fields.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..store.features import FeatureDamage
from ..store import FeatureReader, FeatureWriter, Store, delete_features, is_committed, parquet_from_bytes, validate_id

TEXT_FILE = "text.safetensors"
#: Meta fields that decide the features' values; a reader checks those it is given.
META_KEYS = ("model_key", "family", "skip", "mode", "resolution", "s_max", "steps", "seed", "max_text_tokens",
             "guidance", "prompt", "feature_dtype", "compute_dtype")


def model_key(model_dir: str | Path) -> str:
    """'{dir name}-{12 hex}': a fingerprint of the configs and of every safetensors file's size, head and tail.

    Reading 2 x 64 KiB per weight file (not the whole 24 GB of FLUX.1-dev) still tells two tiny models built
    with different seeds apart, and any change of shape or dtype changes the header and size."""
    d = Path(model_dir)
    h = hashlib.sha256()
    files = sorted(p for p in d.rglob("*") if p.is_file() and (p.suffix in (".json", ".safetensors")))
    for p in files:
        h.update(str(p.relative_to(d)).encode() + b"\0")
        if p.suffix == ".json":
            h.update(p.read_bytes())
            continue
        size = p.stat().st_size
        h.update(size.to_bytes(8, "little"))
        with p.open("rb") as f:
            h.update(f.read(65536))
            f.seek(max(0, size - 65536))
            h.update(f.read(65536))
    return f"{d.resolve().name}-{h.hexdigest()[:12]}"


def make_meta(*, model: str, family: str, skip: tuple[int, int], mode: str, resolution: int, s_max: int | None,
              steps: int, seed: int, max_text_tokens: int, guidance: float, prompt: str, feature_dtype: str,
              compute_dtype: str, model_key_: str | None = None) -> dict[str, Any]:
    return {"model_key": model_key_ or model_key(model), "family": family, "skip": [int(skip[0]), int(skip[1])],
            "mode": mode, "resolution": int(resolution), "s_max": s_max, "steps": int(steps), "seed": int(seed),
            "max_text_tokens": int(max_text_tokens), "guidance": float(guidance), "prompt": prompt,
            "feature_dtype": feature_dtype, "compute_dtype": compute_dtype}


def check_meta(stored: dict[str, Any], expect: dict[str, Any], where: str) -> None:
    """ValueError naming every field where `stored` differs from `expect` (only the keys `expect` has)."""
    diff = [f"{k}: stored {stored.get(k)!r}, wanted {v!r}" for k, v in expect.items()
            if json.loads(json.dumps(stored.get(k))) != json.loads(json.dumps(v))]
    if diff:
        raise ValueError(f"features at {where} were computed for a different configuration ({'; '.join(diff)}); "
                         "rerun `blockskip precompute` for this configuration (with --overwrite)")


def _table_bytes(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def write_features(store: Store, subject_id: str, text: dict[str, torch.Tensor],
                   feats: Iterable[tuple[int, dict[str, torch.Tensor]]], plan: list[dict], meta: dict[str, Any],
                   *, shard_max_bytes: int = 256 * 2**20) -> dict[str, Any]:
    """Write plan, shards, text, index and `_COMMITTED` (last). `feats` must yield exactly the plan's steps in order.

    Streams: holds at most one shard in memory. Returns the commit marker. Any previous set is invalidated
    first (marker, then files), so a crash part-way leaves an uncommitted set that readers refuse."""
    validate_id(subject_id)
    dtype = meta.get("feature_dtype")
    writer = FeatureWriter(store, subject_id, dtype=dtype, shard_max_bytes=shard_max_bytes)
    delete_features(store, subject_id)  # before the plan changes: no old marker may vouch for a new plan
    plan_bytes = _table_bytes(plan)
    store.write_bytes(f"subjects/{subject_id}/plan.parquet", plan_bytes)
    want = [int(r["step"]) for r in plan]
    got: list[int] = []
    for step, f in feats:
        if len(got) >= len(want) or int(step) != want[len(got)]:
            raise ValueError(f"subject {subject_id}: feature step {step} does not follow the plan "
                             f"(expected {want[len(got)] if len(got) < len(want) else 'no more steps'})")
        writer.add(int(step), f)
        got.append(int(step))
    if got != want:
        raise ValueError(f"subject {subject_id}: got {len(got)} feature steps, the plan has {len(want)}")
    text_bytes = st_save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(text.items())})
    store.write_bytes(f"subjects/{subject_id}/features/{TEXT_FILE}", text_bytes)
    extra = {"meta": meta, "text_sha256": hashlib.sha256(text_bytes).hexdigest(),
             "plan_sha256": hashlib.sha256(plan_bytes).hexdigest()}
    writer.commit(extra)
    return store.read_json(f"subjects/{subject_id}/features/_COMMITTED")


def stored_meta(store: Store, subject_id: str) -> dict[str, Any] | None:
    """The meta of a committed set, or None when the subject has none."""
    if not is_committed(store, subject_id):
        return None
    return store.read_json(f"subjects/{validate_id(subject_id)}/features/_COMMITTED").get("extra", {}).get("meta")


def read_features(store: Store, subject_id: str, prefetch: int = 2, expect: dict[str, Any] | None = None
                  ) -> tuple[dict[str, torch.Tensor], list[dict], Iterator[tuple[int, dict[str, torch.Tensor]]]]:
    """(text, plan, iterator of (step, feats) with `prefetch` shards read ahead in a thread).

    FileNotFoundError when there is no committed set; ValueError on a checksum mismatch or, with `expect`,
    when the set was computed for another configuration."""
    reader = FeatureReader(store, subject_id)
    extra = reader.meta.get("extra") or {}
    where = store.url(f"subjects/{subject_id}/features")
    if "meta" not in extra:
        raise ValueError(f"features at {where} have no precompute meta (not written by write_features)")
    if expect:
        check_meta(extra["meta"], expect, where)
    text_bytes = store.read_bytes(f"subjects/{subject_id}/features/{TEXT_FILE}")
    plan_bytes = store.read_bytes(f"subjects/{subject_id}/plan.parquet")
    if hashlib.sha256(text_bytes).hexdigest() != extra.get("text_sha256"):
        raise FeatureDamage(f"{where}/{TEXT_FILE} does not match _COMMITTED (written by another run?)")
    if hashlib.sha256(plan_bytes).hexdigest() != extra.get("plan_sha256"):
        raise FeatureDamage(f"{store.url(f'subjects/{subject_id}/plan.parquet')} does not match its committed "
                            "features")
    text = st_load(text_bytes)
    plan = parquet_from_bytes(plan_bytes).to_pylist()
    if [r["step"] for r in plan] != reader.steps:
        raise ValueError(f"features at {where} do not cover the plan's steps")
    return text, plan, reader.iter_steps(prefetch=prefetch)


def spec_meta(spec, skip: tuple[int, int]) -> dict[str, Any]:
    """The meta fields a TrainSpec pins (everything but the dtypes, which training does not depend on)."""
    from ..models.loading import model_family

    return {"model_key": model_key(spec.model), "family": model_family(spec.model), "skip": list(skip),
            "mode": spec.mode, "resolution": spec.resolution, "s_max": spec.s_max, "steps": spec.steps,
            "seed": spec.seed, "max_text_tokens": spec.max_text_tokens, "guidance": float(spec.optim.guidance),
            "prompt": spec.prompt}


def train_from_store(spec, store: Store, subject_id: str, device: torch.device, ckpt_dir: Path | None = None,
                     *, feature_dtype: str | None = None, prefetch: int = 2,
                     log: Callable[[str], None] = print):
    """Train one subject on features read from the store (local or S3): returns (trainer, metrics, plan).

    The skip plan is spec.skip when given (it must match the stored one), else the stored one (it came from
    --skip-ratio and possibly a selection table at precompute time). Every other field that decides the
    features' values must match the spec, and `feature_dtype` too when given."""
    from .personalize import num_blocks, resolve_skip, train

    meta = stored_meta(store, subject_id)
    if meta is None:
        raise FileNotFoundError(f"no committed features for subject {subject_id!r} in {store.uri}; "
                                "run `blockskip precompute` first")
    skip = resolve_skip(spec, num_blocks(spec.model), None, log=lambda _: None) if spec.skip is not None \
        else tuple(meta["skip"])
    expect = spec_meta(spec, skip)
    if feature_dtype is not None:
        expect["feature_dtype"] = feature_dtype
    text, plan, feats = read_features(store, subject_id, prefetch=prefetch, expect=expect)
    log(f"features of {subject_id} from {store.url(f'subjects/{subject_id}/features')}: {len(plan)} steps, "
        f"{meta['feature_dtype']}, skip n={skip[0]} m={skip[1]}")
    trainer, metrics = train(spec, skip, text, feats, device, ckpt_dir, log)
    metrics["features"] = {"store": store.uri, "feature_dtype": meta["feature_dtype"], "model_key": meta["model_key"]}
    return trainer, metrics, plan

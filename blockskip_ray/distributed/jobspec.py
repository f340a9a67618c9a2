"""The typed job spec of `blockskip run JOB.yaml`: dataclasses with defaults, YAML loading, key=value overrides.

This module does not import ray (it is also used by `blockskip submit` and the tests without a cluster).
Unknown keys are errors everywhere (in the YAML and in overrides) so a typo never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..store.ids import validate_id


@dataclass
class TrainSection:
    mode: str = "blockskip"
    steps: int = 500
    resolution: int = 256
    s_max: int | None = None
    skip: list[int] | None = None  # [n, m]; overrides skip_ratio
    skip_ratio: float | None = 0.3
    seed: int = 0
    max_text_tokens: int = 512
    checkpoint_every: int = 50
    rank: int = 16
    alpha: float | None = None
    lr: float = 1e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    guidance: float = 3.5
    gradient_checkpointing: bool = False
    mixed_precision: str = "bf16"


@dataclass
class SampleSection:
    num: int = 2  # images per subject with the subject's prompt
    steps: int = 20
    size: int | None = None  # default: train.resolution
    eval: bool = False  # also render every eval_prompt of the subject (samples/eval_XX.png)


@dataclass
class RaySection:
    address: str | None = "auto"  # "auto": join a running cluster, else start a local one
    num_cpus: int | None = None  # for a local cluster started by the job
    concurrency: int = 2  # subjects training at the same time
    cpus_per_subject: float = 1.0
    gpus_per_subject: float = 0.0  # fraction of a GPU per subject (0 = CPU training)
    max_failures: int = 1  # Ray Train restarts of a subject's worker, resuming from its last checkpoint


@dataclass
class SelectionSection:
    enabled: bool = True  # run the masking probes when the model has no selection table yet
    skip_ratios: list[float] = field(default_factory=lambda: [0.3])
    options: dict[str, Any] = field(default_factory=dict)  # passed to the probe pipeline as is


@dataclass
class JobSpec:
    job_id: str
    model: str  # a local diffusers pipeline dir, or "tiny:flux" / "tiny:sana" (built into work_dir on first use)
    # JSONL or Parquet catalog, or "synthetic:N" (N synthetic subjects generated into work_dir);
    # null: a selection-only job (runs the masking probes for the model and stops).
    catalog: str | None = None
    store: str = "blockskip-store"  # local path or s3://bucket/prefix
    work_dir: str = "blockskip-work"  # local scratch: built tiny model, synthetic catalog
    strict: bool = False  # refuse the whole job when any catalog row is invalid
    overwrite: bool = False  # retrain subjects that already have an adapter in the store from another job
    train: TrainSection = field(default_factory=TrainSection)
    samples: SampleSection = field(default_factory=SampleSection)
    ray: RaySection = field(default_factory=RaySection)
    selection: SelectionSection = field(default_factory=SelectionSection)
    precompute: dict[str, Any] = field(default_factory=dict)  # options for the Ray Data precompute pipeline

    def __post_init__(self) -> None:
        validate_id(self.job_id, kind="job id")
        if self.ray.concurrency < 1:
            raise ValueError(f"ray.concurrency must be >= 1, got {self.ray.concurrency}")
        if self.ray.gpus_per_subject < 0 or self.ray.cpus_per_subject < 0:
            raise ValueError("ray.cpus_per_subject / ray.gpus_per_subject must be >= 0")
        if self.train.skip is not None and len(self.train.skip) != 2:
            raise ValueError(f"train.skip must be [n, m], got {self.train.skip}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a field type (the few shapes the spec uses)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: bad value {value!r}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    raise ValueError(f"{where}: unsupported field type {tp}")


def _build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join((where + '.' if where else '') + k for k in unknown)}; "
                         f"allowed: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing required key(s): {', '.join(missing)}")
    return cls(**kwargs)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML: numbers, true/false, null, [lists]) in place."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # Values of string fields keep their text (e.g. a model path like "123" or "on" stays a string).
    if isinstance(value, (int, float, bool)) or value is None:
        if _field_type(parts) is str:
            value = raw
    node, cls = data, JobSpec
    for depth, p in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)} if cls is not None else None
        if names is not None and p not in names:
            raise ValueError(f"override {item!r}: unknown key {'.'.join(parts[:depth + 1])!r}; "
                             f"allowed: {', '.join(sorted(names))}")
        if depth == len(parts) - 1:
            node[p] = value
            return
        hint = typing.get_type_hints(cls)[p] if cls is not None else Any
        cls = hint if _is_dataclass_type(hint) else None
        if cls is None and typing.get_origin(hint) is not dict:
            raise ValueError(f"override {item!r}: {'.'.join(parts[:depth + 1])!r} is not a section")
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {'.'.join(parts[:depth + 1])!r} is not a mapping")


def _field_type(parts: list[str]) -> Any:
    cls: Any = JobSpec
    for p in parts:
        if not _is_dataclass_type(cls):
            return None
        hints = typing.get_type_hints(cls)
        if p not in hints:
            return None
        cls = hints[p]
    return cls


def load_spec(source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """A JobSpec from a YAML file (or an already parsed mapping) plus key=value overrides."""
    if isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"job spec {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"job spec {path}: expected a YAML mapping at the top level")
    data = _deep_copy(data)
    for item in overrides:
        apply_override(data, item)
    return _build(JobSpec, data)


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


__all__ = ["JobSpec", "TrainSection", "SampleSection", "RaySection", "SelectionSection", "load_spec",
           "apply_override"]

"""The typed job spec of `blockskip run JOB.yaml`: pydantic dataclasses with defaults and constraints, YAML
loading, key=value overrides.

Every value is checked when the spec is built (types, ranges, choices, cross-field rules, the flags of
selection.options), so `run` and `submit` refuse a bad spec before anything starts; `check_model` adds the
checks that need the model directory (skip plan vs block count, resolution multiple). Unknown keys are errors
everywhere (in the YAML and in overrides) so a typo never silently falls back to a default.
Adding a key is one line in its section: `name: Annotated[StrictInt, Field(ge=0)] = default`.

This module does not import ray (it is also used by `blockskip submit` and the tests without a cluster).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from pydantic.dataclasses import dataclass

from ..store.ids import validate_id

# Strict scalars: "5" is not an integer and 1 is not true (never silently fix bad input); ints are numbers.
Pos = Annotated[StrictInt, Field(ge=1)]
NonNeg = Annotated[StrictInt, Field(ge=0)]
PosFloat = Annotated[StrictFloat, Field(gt=0)]
NonNegFloat = Annotated[StrictFloat, Field(ge=0)]
Ratio = Annotated[StrictFloat, Field(ge=0, lt=1)]  # skip ratios: [0, 1)
_CONFIG = ConfigDict(extra="forbid")
MODES = Literal["blockskip", "lora", "naive-skip", "resize"]  # method/modes.MODES (a test keeps them equal)
FEATURE_DTYPES = Literal["fp32", "bf16", "fp8_e4m3"]  # store/features.DTYPES (a test keeps them equal)


@dataclass(config=_CONFIG)
class TrainSection:
    mode: MODES = "blockskip"
    steps: Pos = 500
    resolution: Annotated[StrictInt, Field(ge=16)] = 256
    s_max: Optional[Annotated[StrictInt, Field(ge=16)]] = None
    skip: Optional[Annotated[list[NonNeg], Field(min_length=2, max_length=2)]] = None  # [n, m]; overrides skip_ratio
    skip_ratio: Optional[Ratio] = 0.3
    seed: NonNeg = 0
    max_text_tokens: Pos = 512
    checkpoint_every: NonNeg = 50
    keep_checkpoints: Pos = 2  # checkpoints kept per subject (older ones deleted); >= 2 allows a fallback
    rank: Pos = 16
    alpha: Optional[PosFloat] = None  # LoRA scale alpha/rank; None: alpha = rank
    lora_targets: Literal["attn", "attn+ff"] = "attn"  # method/lora.TARGET_CHOICES (a test keeps them equal)
    lr: PosFloat = 1e-4
    weight_decay: NonNegFloat = 1e-4
    grad_clip: NonNegFloat = 1.0  # 0: no clipping
    guidance: NonNegFloat = 3.5
    gradient_checkpointing: StrictBool = False
    mixed_precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast on CUDA; CPU always trains in fp32


@dataclass(config=_CONFIG)
class SampleSection:
    num: NonNeg = 2  # images per subject with the subject's prompt
    steps: Pos = 20
    size: Optional[Annotated[StrictInt, Field(ge=16)]] = None  # default: train.resolution
    eval: StrictBool = False  # also render every eval_prompt of the subject (samples/eval_XX.png)


@dataclass(config=_CONFIG)
class RaySection:
    address: Optional[StrictStr] = "auto"  # "auto": join a running cluster, else start a local one; "local"
    num_cpus: Optional[Pos] = None  # for a local cluster started by the job
    concurrency: Pos = 2  # subjects training at the same time
    cpus_per_subject: NonNegFloat = 1.0
    gpus_per_subject: NonNegFloat = 0.0  # fraction of a GPU per subject (0 = CPU training)
    max_failures: NonNeg = 1  # Ray Train restarts of a subject's worker, resuming from its last checkpoint
    # Long-lived workers (distributed/pool.py): N > 0 trains the whole catalog on N Ray Train workers that load the
    # frozen model once (one per GPU when gpus_per_subject > 0: each then takes a whole GPU); 0 = one Ray Train
    # run per subject (`concurrency` at a time), the path every existing job file was written for.
    workers: NonNeg = 0
    pack: Pos = 4  # with workers > 0: subjects trained per step by each worker (packed; 1 = one at a time)


@dataclass(config=_CONFIG)
class SelectionSection:
    enabled: StrictBool = True  # run the masking probes when the model has no selection table yet
    skip_ratios: Annotated[list[Ratio], Field(min_length=1)] = field(default_factory=lambda: [0.3])
    options: dict[str, Any] = field(default_factory=dict)  # flags of `blockskip select` (checked by its parser)


@dataclass(config=_CONFIG)
class PrecomputeSection:
    """Options of the Ray Data precompute pipeline (distributed/precompute.PrecomputeConfig); None keeps its default."""
    enabled: StrictBool = True  # false: each training worker computes its subject's features itself
    feature_dtype: Optional[FEATURE_DTYPES] = None
    num_gpus: Optional[NonNegFloat] = None
    concurrency: Optional[Pos] = None
    batch_size: Optional[Pos] = None
    shard_max_bytes: Optional[Pos] = None
    endpoint_url: Optional[StrictStr] = None

    def options(self) -> dict[str, Any]:
        """The PrecomputeConfig keyword arguments the job sets."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "enabled" and v is not None}


@dataclass(config=_CONFIG)
class JobSpec:
    job_id: StrictStr
    model: StrictStr  # a local diffusers pipeline dir, an s3:// URI, "tiny:flux" / "tiny:sana" (built into work_dir on
    # first use) or "toy:flux" (the pretrained toy model shipped in the package)
    # JSONL or Parquet catalog, or "synthetic:N" (N synthetic subjects generated into work_dir);
    # null: a selection-only job (runs the masking probes for the model and stops).
    catalog: Optional[StrictStr] = None
    store: StrictStr = "blockskip-store"  # local path or s3://bucket/prefix
    work_dir: StrictStr = "blockskip-work"  # local scratch: built tiny model, synthetic catalog
    strict: StrictBool = False  # refuse the whole job when any catalog row is invalid
    overwrite: StrictBool = False  # retrain subjects that already have an adapter in the store from another job
    max_image_pixels: Pos = 4096 * 4096  # per-image pixel budget (header check before decoding; method/images.py)
    keep_features: StrictBool = False  # keep a subject's precomputed features after its adapter is written
    train: TrainSection = field(default_factory=TrainSection)
    samples: SampleSection = field(default_factory=SampleSection)
    ray: RaySection = field(default_factory=RaySection)
    selection: SelectionSection = field(default_factory=SelectionSection)
    precompute: PrecomputeSection = field(default_factory=PrecomputeSection)

    def __post_init__(self) -> None:
        _check(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _RaisingParser(argparse.ArgumentParser):
    """argparse that raises ValueError instead of printing usage and exiting (used to check selection.options)."""

    def error(self, message: str) -> typing.NoReturn:
        raise ValueError(message)


# `blockskip select` flags the job sets itself; selection.options may not repeat them.
_SELECT_OWN = {"model": "model", "store": "store", "skip_ratios": "selection.skip_ratios"}


def select_argv(job: JobSpec, model_dir: str, store_uri: str) -> list[str]:
    """The `blockskip select` command line of the job's selection step (selection.options as its flags)."""
    argv = ["select", "--model", model_dir, "--store", store_uri,
            "--skip-ratios", ",".join(str(r) for r in job.selection.skip_ratios)]
    for key, value in job.selection.options.items():
        if key in _SELECT_OWN:
            raise ValueError(f"selection.options.{key}: set by the job ({_SELECT_OWN[key]}), not an option")
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):  # nargs="+" flags take separate words, the others comma-separated lists
            argv += [flag, *map(str, value)] if key in ("prompts", "probe_subjects") else [flag, ",".join(map(str, value))]
        elif value is True:
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv


def parse_select_argv(argv: list[str]) -> argparse.Namespace:
    """`blockskip select`'s own parser on argv; a bad flag or value is a ValueError naming selection.options."""
    from ..commands import select

    parser = _RaisingParser(prog="blockskip")
    select.register(parser.add_subparsers(dest="command", required=True))
    try:
        return parser.parse_args(argv)
    except ValueError as e:
        raise ValueError(f"selection.options: {e}") from None


def _check(spec: JobSpec) -> None:
    """Rules across fields (the per-field ranges and choices are in the annotations)."""
    validate_id(spec.job_id, kind="job id")
    t = spec.train
    if spec.model.startswith("tiny:") and spec.model not in ("tiny:flux", "tiny:sana"):
        raise ValueError(f"model {spec.model!r}: expected tiny:flux or tiny:sana")
    if spec.model.startswith("toy:") and spec.model != "toy:flux":
        raise ValueError(f"model {spec.model!r}: the only toy pipeline is toy:flux")
    if spec.catalog is not None and spec.catalog.startswith("toy:"):
        from ..toy.catalog import parse_toy_catalog
        parse_toy_catalog(spec.catalog)
    if "://" in spec.model and not spec.model.startswith("s3://"):  # s3://: models/fetch.py
        raise ValueError(f"model {spec.model!r}: give a local diffusers pipeline directory or an s3:// URI")
    if spec.catalog is not None and spec.catalog.startswith("synthetic:"):
        n = spec.catalog.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ValueError(f"catalog {spec.catalog!r}: expected synthetic:N with N >= 1")
    if "://" in spec.store and not (spec.store.startswith("s3://") and spec.store[5:].strip("/")):
        raise ValueError(f"store {spec.store!r}: expected a local path or s3://bucket/prefix")
    if t.mode == "lora" and (t.skip not in (None, [0, 0]) or t.skip_ratio):
        raise ValueError("train.mode=lora trains every block: set train.skip_ratio=null and leave train.skip unset")
    if t.s_max is not None and t.s_max < t.resolution:
        raise ValueError(f"train.s_max ({t.s_max}) must be >= train.resolution ({t.resolution})")
    parse_select_argv(select_argv(spec, "MODEL", "STORE"))


def check_model(spec: JobSpec, model_dir: str) -> tuple[int, int] | None:
    """The checks that need the model: the explicit skip plan against its block count, the training and sample
    sizes against its pixel multiple. Returns the explicit skip plan (None: from the ratio)."""
    from ..method.modes import check_skip
    from ..method.personalize import num_blocks
    from ..models.loading import pixel_multiple

    multiple = pixel_multiple(model_dir)
    for key, value in (("train.resolution", spec.train.resolution), ("samples.size", spec.samples.size)):
        if value is not None and value % multiple:
            raise ValueError(f"{key}={value} must be a multiple of {multiple} for this model")
    if spec.train.skip is None:
        return None
    try:
        return check_skip(tuple(spec.train.skip), num_blocks(model_dir))
    except ValueError as e:
        raise ValueError(f"train.skip: {e}") from None


def _location(loc: tuple) -> str:
    return ".".join(str(x) for x in loc)


def _allowed(loc: tuple) -> str:
    cls: Any = JobSpec
    for p in loc[:-1]:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        cls = hints.get(p)
    names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []
    return ", ".join(sorted(names))


def _one_line(e: ValidationError) -> str:
    out = []
    for err in e.errors():
        where, kind = _location(err["loc"]), err["type"]
        if kind in ("unexpected_keyword_argument", "extra_forbidden"):
            out.append(f"unknown key {where!r}; allowed: {_allowed(err['loc'])}")
        elif kind in ("missing_argument", "missing"):
            out.append(f"missing required key {where!r}")
        elif kind == "value_error":
            out.append(str(err["ctx"]["error"]))
        else:
            out.append(f"{where}: {err['msg'].lower()} (got {err['input']!r})")
    return "; ".join(out)


def _build(data: dict[str, Any]) -> JobSpec:
    try:
        return JobSpec(**data)
    except ValidationError as e:
        raise ValueError(_one_line(e)) from None
    except TypeError as e:  # a non-string top-level key
        raise ValueError(f"job spec: {e}") from None


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


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


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The job file as a mapping; a missing file or a YAML syntax error is one line naming the place."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"job spec {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"job spec {path}: invalid YAML{where}: {what}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"job spec {path}: expected a YAML mapping at the top level")
    return data


def load_spec(source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """A checked JobSpec from a YAML file (or an already parsed mapping) plus key=value overrides."""
    data = _deep_copy(source if isinstance(source, dict) else read_yaml(source))
    for item in overrides:
        apply_override(data, item)
    return _build(data)


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


__all__ = ["JobSpec", "TrainSection", "SampleSection", "RaySection", "SelectionSection", "PrecomputeSection",
           "load_spec", "apply_override", "check_model", "select_argv", "parse_select_argv"]

"""The pure part of the HTTP image service: request schema, limits, auth, PNG generation with one adapter.

Ray Serve wiring lives in `blockskip_ray.distributed.serve_app`; everything here is plain Python so it is
tested without Ray. `AdapterHost` owns one pipeline holding several LoRA adapters at once and guarantees
that requests for different adapters never mix: every pipeline mutation (load, delete, set_adapters) and
every generation runs under one lock, and the active set is `[adapter]` right before each generation.
"""
from __future__ import annotations

import io
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .http_guard import check_bearer, token_digest  # noqa: F401 (re-exported)
from .store import ADAPTER_FILE, Store, adapter_prefix, fetch_adapter
from .store.ids import ID_PATTERN, is_valid_id, validate_id

if TYPE_CHECKING:  # torch is imported where it is used: `blockskip serve --help` stays fast
    import torch

MAX_SEED = 2**63 - 1


class ImageRequest(BaseModel):
    """Body of `POST /v1/images`. Strict types: "4" is not an int, 4.0 is not an int, unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    adapter: str = Field(description=f"adapter id (= subject id), matching {ID_PATTERN}", examples=["toy-1"])
    prompt: str = Field(min_length=1, description="text prompt (with the subject's token, e.g. 'sks')",
                        examples=["a photo of sks toy on the beach"])
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="RNG seed; same request + seed = same PNG bytes. "
                             "Random when absent (returned in the X-Seed header).")
    steps: int | None = Field(None, ge=1, description="denoising steps (server default and maximum apply)")
    guidance: float | None = Field(None, ge=0, description="guidance scale (pipeline default when absent)")
    width: int | None = Field(None, ge=1, description="image width in pixels, a multiple of the server's multiple")
    height: int | None = Field(None, ge=1, description="image height in pixels, a multiple of the server's multiple")

    @field_validator("adapter")
    @classmethod
    def _adapter_id(cls, v: str) -> str:
        # Checked before the id reaches the store: "../x", "a/b", "" and friends never become paths.
        if not is_valid_id(v):
            raise ValueError(f"invalid adapter id: must match {ID_PATTERN} with no '..'")
        return v


@dataclass(frozen=True)
class ServeLimits:
    """Server-side bounds on what one request may cost. Defaults are safe for FLUX/SANA on one GPU."""

    max_steps: int = 50
    default_steps: int = 28
    min_side: int = 64
    max_side: int = 1024
    default_side: int = 512
    multiple: int = 16  # FLUX packs 2x2 latents of a factor-8 VAE; use 32 for SANA's DC-AE
    max_prompt_chars: int = 1000
    max_guidance: float = 30.0
    # Compute budget of one request: steps x width x height. The default admits 28 steps at 1024x1024 (or 50
    # at 768x768) and refuses 50 at 1024x1024, the request that held a replica for minutes.
    max_step_pixels: int = 28 * 1024 * 1024

    def __post_init__(self) -> None:
        if not (1 <= self.default_steps <= self.max_steps):
            raise ValueError(f"default_steps {self.default_steps} must be in [1, max_steps={self.max_steps}]")
        if self.multiple < 1 or self.min_side < self.multiple or self.max_side < self.min_side:
            raise ValueError(f"bad size limits: need multiple <= min_side <= max_side, got {self}")
        if not (self.min_side <= self.default_side <= self.max_side) or self.default_side % self.multiple:
            raise ValueError(f"default_side {self.default_side} must be a multiple of {self.multiple} "
                             f"in [{self.min_side}, {self.max_side}]")
        if self.max_prompt_chars < 1 or self.max_guidance < 0:
            raise ValueError(f"bad limits: {self}")
        if self.max_step_pixels < self.default_steps * self.default_side ** 2:
            raise ValueError(f"max_step_pixels {self.max_step_pixels} refuses the default request "
                             f"({self.default_steps} steps at {self.default_side}x{self.default_side})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Job:
    """A request with every default filled in and every limit checked: what the generator runs."""

    adapter: str
    prompt: str
    seed: int
    steps: int
    guidance: float | None
    width: int
    height: int


def resolve(req: ImageRequest, limits: ServeLimits, random_seed: int) -> Job:
    """Apply defaults and limits; ValueError (a client error, 422) names the first violated limit."""
    if len(req.prompt) > limits.max_prompt_chars:
        raise ValueError(f"prompt too long: {len(req.prompt)} characters > {limits.max_prompt_chars}")
    steps = limits.default_steps if req.steps is None else req.steps
    if steps > limits.max_steps:
        raise ValueError(f"steps {steps} > max_steps {limits.max_steps}")
    if req.guidance is not None and req.guidance > limits.max_guidance:
        raise ValueError(f"guidance {req.guidance} > max_guidance {limits.max_guidance}")
    sides = {}
    for name in ("width", "height"):
        v = getattr(req, name)
        v = limits.default_side if v is None else v
        if not (limits.min_side <= v <= limits.max_side):
            raise ValueError(f"{name} {v} outside [{limits.min_side}, {limits.max_side}]")
        if v % limits.multiple:
            raise ValueError(f"{name} {v} is not a multiple of {limits.multiple}")
        sides[name] = v
    cost = steps * sides["width"] * sides["height"]
    if cost > limits.max_step_pixels:
        raise ValueError(f"compute budget exceeded: steps x width x height = {cost} > max_step_pixels "
                         f"{limits.max_step_pixels}; use fewer steps or a smaller image")
    seed = random_seed if req.seed is None else req.seed
    return Job(req.adapter, req.prompt, seed, steps, req.guidance, sides["width"], sides["height"])


def encode_png(image) -> bytes:
    """PIL image -> PNG bytes. PIL writes no timestamp, so equal pixels give equal bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Cancelled(Exception):
    """The request was abandoned (its client disconnected) before or between denoising steps."""


class AdapterUnusable(ValueError):
    """The adapter in the store cannot be applied to this pipeline (damaged file, or made for another model)."""


def check_adapter(transformer, weights: str | Path) -> None:
    """Refuse an adapter whose LoRA tensors do not fit the transformer's layers, before the pipeline sees it.

    diffusers' load_lora_weights *widens* a base layer whose LoRA input is wider than the layer (a feature for
    FLUX Control LoRAs); a damaged or foreign adapter in the store would thus change the shared pipeline for
    every later request (measured: each request after it failed with a shape error). Checked from the header
    only: every `transformer.<module>.lora_A/B.weight` must name an existing Linear/Conv layer with
    lora_A = (r, in, ...), lora_B = (out, r, ...)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same answer
        raise AdapterUnusable(f"unreadable adapter weights ({type(e).__name__})") from None
    modules = dict(transformer.named_modules())
    ranks: dict[str, int] = {}
    for key, shape in shapes.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if not (key.startswith("transformer.") and key.endswith(suffix)):
                continue
            name = key[len("transformer."):-len(suffix)]
            layer = modules.get(name)
            fan_in = getattr(layer, "in_features", getattr(layer, "in_channels", None))
            fan_out = getattr(layer, "out_features", getattr(layer, "out_channels", None))
            if fan_in is None or fan_out is None:
                raise AdapterUnusable(f"adapter tensor {key}: no such layer in this model")
            dim, rank = (shape[1], shape[0]) if part == "lora_A" else (shape[0], shape[1])
            want = fan_in if part == "lora_A" else fan_out
            if len(shape) < 2 or dim != want or ranks.setdefault(name, rank) != rank:
                raise AdapterUnusable(f"adapter tensor {key} has shape {list(shape)}: does not fit layer "
                                      f"{name} ({fan_in} -> {fan_out})")


def generate_image(pipe, job: Job, cancel: threading.Event | None = None, progress: list[int] | None = None):
    """One image from a pipeline whose active adapter set is already chosen. Seeded on CPU for reproducibility.

    `cancel`: checked before the pipeline starts and after every denoising step (diffusers'
    `callback_on_step_end`); once set, `Cancelled` is raised and the remaining steps and the VAE decode are
    skipped. `progress`, when given, gets one entry per finished step (for stats and tests)."""
    extra: dict[str, Any] = {}
    if cancel is not None or progress is not None:
        def on_step_end(_pipe, step: int, _t, kwargs: dict) -> dict:
            if progress is not None:
                progress.append(step)
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled after step {step + 1} of {job.steps}")
            return kwargs

        extra["callback_on_step_end"] = on_step_end
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled before the first step")
    if type(pipe).__name__ == "SanaPipeline":
        extra["use_resolution_binning"] = False  # answer exactly the size asked for
    if job.guidance is not None:
        extra["guidance_scale"] = job.guidance
    import torch

    from .models.loading import generation_kwargs
    extra.update(generation_kwargs(pipe))  # e.g. the toy model's 16 text tokens
    g = torch.Generator("cpu").manual_seed(job.seed)
    with torch.inference_mode():
        out = pipe(job.prompt, num_inference_steps=job.steps, height=job.height, width=job.width, generator=g, **extra)
    return out.images[0]


def pick_device_dtype(device: str = "auto") -> tuple["torch.device", "torch.dtype"]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)


class AdapterHost:
    """One pipeline plus the LoRA adapters currently loaded into it, fetched from a store on demand.

    The multiplex cache (Ray Serve) decides *which* adapters stay loaded; this class keeps the pipeline in
    step with it: `load` adds one (`load_lora_weights(dir, adapter_name=id)`), `unload` deletes it
    (`delete_adapters`). A request whose adapter was evicted between routing and generation still gets the
    right adapter: `generate_png` loads it for that one generation and deletes it again.
    """

    def __init__(self, pipe, store: Store, cache_dir: str | Path):
        self.pipe = pipe
        self.store = store
        self.cache_dir = Path(cache_dir)
        self.lock = threading.RLock()  # re-entrant: an eviction may run from a finalizer on a thread holding it
        self.loaded: set[str] = set()  # adapter ids loaded in the pipeline

    def exists(self, adapter_id: str) -> bool:
        return self.store.exists(f"{adapter_prefix(adapter_id)}/{ADAPTER_FILE}")

    def pipeline_adapters(self) -> list[str]:
        with self.lock:
            return sorted({a for names in self.pipe.get_list_adapters().values() for a in names})

    def load(self, adapter_id: str) -> None:
        """Fetch (KeyError if unknown) and load into the pipeline. The download runs outside the lock.

        Each load fetches into its own temp dir, removed once the weights are in memory, so concurrent
        fetches of the same adapter never step on each other's files.
        """
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix="fetch-"))
        try:
            local = fetch_adapter(self.store, adapter_id, tmp)
            check_adapter(self.pipe.transformer, Path(local) / ADAPTER_FILE)
            with self.lock:
                if adapter_id in self.pipeline_adapters():
                    self.pipe.delete_adapters(adapter_id)  # a transient copy, or a reload: replace it
                try:
                    self.pipe.load_lora_weights(str(local), adapter_name=adapter_id)
                except Exception as e:  # noqa: BLE001 - leave no half-loaded adapter behind
                    if adapter_id in self.pipeline_adapters():
                        self.pipe.delete_adapters(adapter_id)
                    raise AdapterUnusable(f"adapter weights rejected by the pipeline ({type(e).__name__})") from e
                self.loaded.add(adapter_id)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def unload(self, adapter_id: str) -> None:
        with self.lock:
            if adapter_id in self.pipeline_adapters():
                self.pipe.delete_adapters(adapter_id)
            self.loaded.discard(adapter_id)

    def generate_png(self, job: Job, cancel: threading.Event | None = None,
                     progress: list[int] | None = None) -> bytes:
        """PNG bytes of `job`; `Cancelled` when `cancel` is set before it starts or between its steps."""
        with self.lock:
            if cancel is not None and cancel.is_set():  # abandoned while it waited for the pipeline
                raise Cancelled("cancelled before the first step")
            transient = job.adapter not in self.loaded
            if transient:  # evicted after this request was routed: load it just for this generation
                self.load(job.adapter)
            try:
                self.pipe.set_adapters([job.adapter])
                image = generate_image(self.pipe, job, cancel, progress)
            finally:
                if transient:
                    self.unload(job.adapter)
        return encode_png(image)


def build_tiny_adapter_store(root: str | Path, subject_ids: list[str], steps: int = 6, lr: float = 1e-2,
                             family: str = "flux") -> tuple[Path, Path]:
    """Tiny model + one quickly trained adapter per subject in a local store at `root/store`, for tests,
    benchmarks and the demo. Each subject gets its own synthetic images and seed, and a high learning rate,
    so the adapters differ clearly. Returns (model_dir, store_dir)."""
    from .method.images import make_synthetic_subject
    from .method.personalize import TrainSpec, personalize
    from .method.trainer import OptimConfig
    from .models.tiny import init_model
    from .store import put_adapter

    root = Path(root)
    model = root / "model"
    if not (model / "model_index.json").is_file():
        init_model(family, model)
    store = Store.open(str(root / "store"))
    for i, sid in enumerate(subject_ids):
        validate_id(sid)
        images = root / "images" / sid
        make_synthetic_subject(images, n=3, size=64, seed=100 + i)
        out = root / "train" / sid
        personalize(TrainSpec(model=str(model), images=str(images), prompt="a photo of sks toy", out=str(out),
                              subject_id=sid, steps=steps, resolution=64, max_text_tokens=32, num_samples=0,
                              seed=i, device="cpu", optim=OptimConfig(lr=lr)), log=lambda _msg: None)
        put_adapter(store, sid, out / "adapter")
    return model, root / "store"

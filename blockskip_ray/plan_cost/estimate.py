"""Full-scale training memory and FLOPs by tracing one real `SkipTrainer.train_step` on fake tensors.

No formula: the transformer is built from its config on the meta device, the skipped blocks are
stripped (`strip_blocks`, as `load_kept_transformer` does), LoRA and AdamW are added by the project's
own `SkipTrainer`, then every parameter is replaced by a FakeTensor (shape + dtype, no data) and one
training step of the trainer's own code runs under FakeTensorMode, with `LiveMemory` and
`FlopCounterMode` watching every op.

Modeling the GPU run on a CPU-only machine (`target="cuda"`, the default):
  * frozen weights bf16, LoRA fp32 (what `train()` loads on CUDA and what `add_lora` makes);
  * the trainer's autocast is CUDA-only and fake CUDA tensors cannot be made with this CPU build of
    torch ("PyTorch is not linked with support for cuda devices"), so the step runs on fake CPU tensors
    under CPU autocast bf16 (`trainer._autocast` is swapped on this one trainer instance). CPU and CUDA
    autocast both run linear/matmul/bmm in bf16, which is what dominates memory here;
  * AdamW with foreach=True: what torch picks for CUDA parameters (it picks the per-tensor loop on CPU);
  * attention: SDPA's fake kernel on CPU allocates its output and logsumexp only, as flash attention does.
The traced step is a steady-state step: AdamW's state is created first with one optimizer step on zero
gradients, so the peak includes optimizer state, as every step after the first does on the GPU.
`target="cpu"` models the trainer's CPU run instead (fp32, no autocast, AdamW's CPU default); the
accuracy test compares it and the GPU model with real tensors on small configs.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..method.modes import get_mode
from ..method.trainer import OptimConfig, SkipTrainer
from ..models.configs import TRANSFORMER_CONFIGS, named_config
from ..models.loading import strip_blocks
from ..models.stack import make_stack
from .tracker import CATEGORIES, LiveMemory, ScalarReads

GIB = 2**30
_CLASSES = {"flux": "FluxTransformer2DModel", "sana": "SanaTransformer2DModel"}


@dataclass(frozen=True)
class EstimateSpec:
    model: str  # a name from models/configs.py or a diffusers directory
    resolution: int
    skip: tuple[int, int] | None = None
    skip_ratio: float | None = None
    mode: str = "blockskip"
    rank: int = 16
    lora_targets: str = "attn"  # "attn" or "attn+ff" (method.lora.TARGET_CHOICES), as `train --lora-targets`
    batch_size: int = 1
    text_tokens: int = 512
    gradient_checkpointing: bool = False
    target: str = "cuda"  # which run to model: "cuda" (bf16 weights, autocast) or "cpu" (fp32)


def model_config(model: str) -> tuple[str, dict[str, Any], int]:
    """(family, transformer config, VAE scale factor) for a config name or a diffusers directory."""
    if model in TRANSFORMER_CONFIGS:
        family, cfg = named_config(model)
        # VAE downsampling: FLUX 8 (tiny too), SANA's DC-AE 32; models/tiny.py builds SANA-tiny with 4
        vae = 8 if family == "flux" else (4 if model == "sana-tiny" else 32)
        return family, cfg, vae
    from ..models.loading import model_family, vae_scale_factor

    if not Path(model).is_dir():
        named_config(model)  # raises the "unknown model" error listing the names
    family = model_family(model)
    cfg = json.loads((Path(model) / "transformer" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return family, cfg, vae_scale_factor(model)


def resolve_skip(spec: EstimateSpec, num_blocks: int) -> tuple[int, int]:
    """`blockskip train`'s own rules (personalize.resolve_skip), without a selection table."""
    from ..method.personalize import TrainSpec
    from ..method.personalize import resolve_skip as train_resolve_skip

    ts = TrainSpec(model=spec.model, images="", prompt="", out="", skip=spec.skip, skip_ratio=spec.skip_ratio,
                   mode=spec.mode)
    return train_resolve_skip(ts, num_blocks, None, log=lambda _msg: None)


def build_trainer(family: str, cfg: dict[str, Any], skip: tuple[int, int], spec: EstimateSpec, vae: int):
    """The project's trainer around a meta-built, block-stripped transformer (LoRA + AdamW on meta)."""
    import diffusers

    cls = getattr(diffusers, _CLASSES[family])
    with torch.device("meta"):
        t = cls.from_config(cfg)
    t.requires_grad_(False)
    n_blocks = len(make_stack(t, vae).blocks)
    kept = range(skip[0], n_blocks - skip[1])
    strip_blocks(t, [i for i in range(n_blocks) if i not in kept])
    stack = make_stack(t, vae)
    optim = OptimConfig(rank=spec.rank, targets=spec.lora_targets, gradient_checkpointing=spec.gradient_checkpointing)
    return SkipTrainer(t, stack, skip, get_mode(spec.mode), optim, "meta")


def to_fake(trainer: SkipTrainer, weight_dtype: torch.dtype, make: Callable) -> None:
    """Replace every meta tensor of the trainer by `make(shape, dtype)`; frozen floats become weight_dtype.

    Module attributes are reassigned (not `.to()`): `Module._apply` swaps FakeTensors in place, which
    fails on tensors that FakeTensorMode holds weakrefs to. The trainer's parameter list and AdamW's
    param groups are re-pointed at the new parameters."""
    new: dict[int, nn.Parameter] = {}
    for mod in trainer.t.modules():
        for k, p in list(mod._parameters.items()):
            if p is None:
                continue
            dtype = p.dtype if p.requires_grad or not p.is_floating_point() else weight_dtype
            q = nn.Parameter(make(p.shape, dtype), requires_grad=p.requires_grad)
            mod._parameters[k] = new[id(p)] = q
        for k, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[k] = make(b.shape, weight_dtype if b.is_floating_point() else b.dtype)
    trainer.params = [new[id(p)] for p in trainer.params]
    for g in trainer.opt.param_groups:
        g["params"] = [new[id(p)] for p in g["params"]]


def model_target(trainer: SkipTrainer, target: str) -> None:
    """Make the CPU trainer behave as the `target` run does (see the module docstring)."""
    trainer.device = torch.device("cpu")
    if target == "cuda":
        trainer._autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # type: ignore[method-assign]
        for g in trainer.opt.param_groups:
            g["foreach"] = True


def warm_optimizer(trainer: SkipTrainer) -> None:
    """Create AdamW's state as after a first step (zero gradients), then drop the gradients again."""
    for p in trainer.params:
        p.grad = torch.zeros_like(p)
    trainer.opt.step()
    trainer.opt.zero_grad(set_to_none=True)


def step_inputs(family: str, cfg: dict[str, Any], spec: EstimateSpec, skip: tuple[int, int], vae: int,
                make: Callable) -> tuple[dict, dict]:
    """The subject's text and one step's features with the shapes FeatureComputer produces (fp32, host)."""
    b, r, lt = spec.batch_size, spec.resolution, spec.text_tokens
    mode = get_mode(spec.mode)
    n, m = skip
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f32 = torch.float32
    if family == "flux":
        g = r // vae  # latent grid; 2x2 packing gives (R/16)^2 tokens of 4x the latent channels
        tokens, ch = (g // 2) ** 2, cfg["in_channels"]
        text = {"prompt_embeds": make((b, lt, cfg["joint_attention_dim"]), f32),
                "pooled": make((b, cfg["pooled_projection_dim"]), f32)}
        feats: dict[str, Any] = {"target": make((b, tokens, ch), f32), "x_t": make((b, tokens, ch), f32)}
        state = {"h": make((b, tokens, dim), f32), "e": make((b, lt, dim), f32)}
    else:
        g = r // vae
        ch = cfg["in_channels"]
        text = {"prompt_embeds": make((b, lt, cfg["caption_channels"]), f32), "prompt_mask": make((b, lt), f32)}
        feats = {"target": make((b, cfg.get("out_channels") or ch, g, g), f32), "x_t": make((b, ch, g, g), f32)}
        state = {"h": make((b, g * g, dim), f32)}
    feats["sigma"] = make((b,), f32)
    feats["latent_hw"] = (g, g)  # a tuple, not a tensor: make_cond reads its values, a fake tensor has none
    if mode.features and n:
        feats.update(state)
        del feats["x_t"]  # FeatureComputer omits x_t when the leading state replaces the embedders
    if mode.features and m:
        feats["delta"] = make(state["h"].shape, f32)
    return text, feats


def check_spec(spec: EstimateSpec, family: str, vae: int, patch: int) -> None:
    multiple = vae * (2 if family == "flux" else patch)  # FLUX packs 2x2 latents per token
    if spec.resolution <= 0 or spec.resolution % multiple:
        raise ValueError(f"resolution must be a positive multiple of {multiple} for {family} "
                         f"(VAE factor x patch), got {spec.resolution}")
    for name in ("rank", "batch_size", "text_tokens"):
        if getattr(spec, name) <= 0:
            raise ValueError(f"{name.replace('_', '-')} must be positive, got {getattr(spec, name)}")
    if spec.target not in ("cuda", "cpu"):
        raise ValueError(f"target must be 'cuda' or 'cpu', got {spec.target!r}")


@dataclass
class Prepared:
    trainer: SkipTrainer
    text: dict[str, Any]
    feats: dict[str, Any]
    family: str
    skip: tuple[int, int]
    num_blocks: int


def prepare(spec: EstimateSpec, make: Callable[[tuple, torch.dtype], torch.Tensor],
            mode: Any = None) -> Prepared:
    """Validate, build the trainer on meta, then (under `mode`) turn its tensors into `make(shape, dtype)` ones.

    `make` makes fake tensors for the estimate and real ones for the measurement it is tested against,
    so both sides run exactly the same construction and the same step. The meta build (diffusers +
    peft) must happen outside FakeTensorMode: peft's `.to()` cannot swap FakeTensors."""
    family, cfg, vae = model_config(spec.model)
    get_mode(spec.mode)
    check_spec(spec, family, vae, cfg.get("patch_size", 1) if family == "sana" else 1)
    n_blocks = _num_blocks(family, cfg)
    skip = resolve_skip(spec, n_blocks)
    trainer = build_trainer(family, cfg, skip, spec, vae)
    with mode if mode is not None else contextlib.nullcontext():
        to_fake(trainer, torch.bfloat16 if spec.target == "cuda" else torch.float32, make)
        model_target(trainer, spec.target)
        text, feats = step_inputs(family, cfg, spec, skip, vae, make)
    return Prepared(trainer, text, feats, family, skip, n_blocks)


def estimate(spec: EstimateSpec) -> dict[str, Any]:
    """Trace one steady-state training step at full scale; returns the JSON the CLI prints."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.perf_counter()
    make = lambda shape, dtype: torch.empty(shape, dtype=dtype)  # noqa: E731 - under FakeTensorMode: no data
    reads = ScalarReads()
    fake = FakeTensorMode(allow_non_fake_inputs=False)
    pr = prepare(spec, make, fake)
    with fake:
        trainer = pr.trainer
        with reads:
            warm_optimizer(trainer)
        flops, fwd = FlopCounterMode(display=False), []
        if spec.gradient_checkpointing:
            # FlopCounterMode's module tracking keeps the activations that checkpointing recomputes during
            # backward alive (flux-tiny, skip 1,1: 1.66 MB traced with the counter, 1.30 MB without it and
            # 1.30 MB on real tensors), so memory and FLOPs come from two traces of the same step.
            mem = _traced_step(pr, reads)
            _traced_step(pr, reads, flops, fwd)
        else:
            mem = _traced_step(pr, reads, flops, fwd)
    return {
        "model": spec.model, "family": pr.family, "mode": spec.mode, "resolution": spec.resolution,
        "skip": list(pr.skip), "kept_blocks": [pr.skip[0], pr.num_blocks - pr.skip[1] - 1],
        "num_blocks": pr.num_blocks, "rank": spec.rank, "lora_targets": spec.lora_targets, "batch_size": spec.batch_size,
        "text_tokens": spec.text_tokens, "gradient_checkpointing": spec.gradient_checkpointing,
        "target": spec.target,
        "peak_memory_gib": mem.peak / GIB,
        "breakdown_gib": {k: mem.peak_split[k] / GIB for k in CATEGORIES},
        "peak_memory_bytes": mem.peak,
        "tflops_per_step": flops.get_total_flops() / 1e12,
        "tflops_forward": (fwd[0] if fwd else flops.get_total_flops()) / 1e12,
        "trainable_params": sum(p.numel() for p in trainer.params),
        "frozen_params": sum(p.numel() for p in trainer.t.parameters() if not p.requires_grad),
        "weight_dtype": "bfloat16" if spec.target == "cuda" else "float32",
        "scalar_reads_stubbed": reads.count,
        "trace_seconds": time.perf_counter() - t0,
    }


def _traced_step(pr, reads: ScalarReads, flops: FlopCounterMode | None = None, fwd: list[int] | None = None
                 ) -> LiveMemory:
    """One training step under the live-memory tracker (and the FLOP counter when given; `fwd` then gets the
    forward pass's FLOPs, read when the autograd engine starts)."""
    trainer = pr.trainer
    mem = LiveMemory()
    mem.register_trainer(trainer.t, trainer.params, trainer.opt)
    if flops is not None and fwd is not None:
        mem.on_backward = lambda: fwd.append(flops.get_total_flops())
    try:
        with mem, flops if flops is not None else contextlib.nullcontext(), reads:
            trainer.train_step(pr.text, pr.feats)
    finally:
        mem.close()
    return mem


def _num_blocks(family: str, cfg: dict[str, Any]) -> int:
    return cfg["num_layers"] + (cfg.get("num_single_layers", 0) if family == "flux" else 0)

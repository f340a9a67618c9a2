"""Load pipelines and transformers from a local diffusers directory, the tiny one and real weights alike.

`load_kept_transformer` builds the transformer on the meta device, drops the skipped blocks, and reads
from the safetensors files only the tensors of what is left (embedders, kept blocks, head): skipped
blocks are never materialized in the trainer (paper Sec. 3.3 offloads them; we never load them).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .fetch import materialize
from .stack import FluxStack, SanaStack, SkippedBlock, make_stack

FAMILIES = {"FluxPipeline": "flux", "SanaPipeline": "sana"}
_TRANSFORMERS = {"flux": "FluxTransformer2DModel", "sana": "SanaTransformer2DModel"}


def model_family(model_dir: str | Path) -> str:
    # An s3:// URI, or a model-cache path resolved on another node: fetched (once, verified) on this node.
    d = materialize(model_dir)
    index = d / "model_index.json"
    if not index.is_file():
        raise ValueError(f"unknown model {str(model_dir)!r}: not a diffusers directory (no model_index.json); "
                         "build one with `blockskip init-model` or point to a local FLUX/SANA directory")
    cls = json.loads(index.read_text()).get("_class_name", "")
    if cls not in FAMILIES:
        raise ValueError(f"unsupported pipeline {cls!r} in {d}: expected one of {sorted(FAMILIES)}")
    return FAMILIES[cls]


def vae_scale_factor(model_dir: str | Path) -> int:
    cfg = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
    blocks = cfg.get("block_out_channels") or cfg.get("encoder_block_out_channels")
    return 2 ** (len(blocks) - 1)


def pixel_multiple(model_dir: str | Path) -> int:
    """Crop sides and the training resolution must be multiples of this: VAE factor x patch size.

    FLUX: the pipeline packs 2x2 latent patches into one token (the transformer's own patch_size is 1), so
    8 x 2 = 16 px (design section 2). SANA: the transformer's patch_size (1 for the released models)."""
    family = model_family(model_dir)
    if family == "flux":
        return vae_scale_factor(model_dir) * 2
    cfg = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())
    return vae_scale_factor(model_dir) * int(cfg.get("patch_size", 1))


def load_pipeline(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    import diffusers

    model_dir = materialize(model_dir)
    family = model_family(model_dir)
    cls = getattr(diffusers, {"flux": "FluxPipeline", "sana": "SanaPipeline"}[family])
    pipe = cls.from_pretrained(str(model_dir), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def strip_blocks(transformer: nn.Module, skipped: list[int]) -> nn.Module:
    """Replace the given blocks (execution-order indices) with parameter-free placeholders, in place."""
    stack = make_stack(transformer)
    for i in skipped:
        if isinstance(stack, FluxStack) and i >= stack.n_double:
            transformer.single_transformer_blocks[i - stack.n_double] = SkippedBlock()
        else:
            transformer.transformer_blocks[i] = SkippedBlock()
    return transformer


def _weight_files(tdir: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, for single-file and sharded (index.json) checkpoints."""
    index = tdir / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        return {k: tdir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = tdir / "diffusion_pytorch_model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no safetensors weights in {tdir} (only safetensors is read, never pickle)")
    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def load_kept_transformer(model_dir: str | Path, skipped: list[int], device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32) -> tuple[nn.Module, FluxStack | SanaStack]:
    import diffusers

    model_dir = materialize(model_dir)
    family = model_family(model_dir)
    tdir = Path(model_dir) / "transformer"
    cls = getattr(diffusers, _TRANSFORMERS[family])
    with torch.device("meta"):
        transformer = cls.from_config(cls.load_config(str(tdir)))
    strip_blocks(transformer, skipped)
    wanted = transformer.state_dict().keys()
    files = _weight_files(tdir)
    missing = [k for k in wanted if k not in files]
    if missing:
        raise ValueError(f"{tdir} lacks {len(missing)} tensors the trainer needs, e.g. {missing[:3]}")
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for k in wanted:
        by_file.setdefault(files[k], []).append(k)
    for path, keys in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for k in keys:  # only the tensors asked for are read from disk
                state[k] = f.get_tensor(k).to(dtype)
    transformer.load_state_dict(state, strict=True, assign=True)
    transformer.to(device)
    if any(t.is_meta for t in list(transformer.parameters()) + list(transformer.buffers())):
        raise RuntimeError("some transformer tensors were not loaded (still on the meta device)")
    transformer.requires_grad_(False).eval()
    return transformer, make_stack(transformer, vae_scale_factor(model_dir) if family == "sana" else None)

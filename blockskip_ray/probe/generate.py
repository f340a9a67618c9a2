"""One probe generation: the stock pipeline (optionally + a LoRA adapter), some blocks masked, a seed.

`ProbeWorker` holds the pipeline and the DINO model of one process so that many generations reuse them;
the Ray layer keeps one per worker process. Adapters travel as {file name: bytes} (a LoRA adapter is
small), so workers on other nodes need no shared filesystem for them; the base model directory must be
readable at the same path on every node.
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import torch
from PIL import Image

from ..models.loading import generation_kwargs, load_pipeline
from .masking import masked
from .metrics import DinoEmbedder

AdapterFiles = dict[str, bytes]


def adapter_files(adapter_dir: str | Path) -> AdapterFiles:
    d = Path(adapter_dir)
    files = {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.suffix in (".safetensors", ".json")}
    if not any(n.endswith(".safetensors") for n in files):
        raise FileNotFoundError(f"no LoRA adapter (*.safetensors) in {d}")
    return files


def adapter_digest(files: AdapterFiles | None) -> str | None:
    if not files:
        return None
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name])
    return h.hexdigest()[:16]


TINY_DEFAULTS = {"steps": 4, "resolution": 64}
FULL_DEFAULTS = {"steps": 28, "resolution": 512}


def is_tiny_model(model_dir: str | Path) -> bool:
    """A tiny test model (inner dim < 256; `blockskip init-model` builds dim 32 with random weights)."""
    from .selection import transformer_config

    cfg = transformer_config(model_dir)  # "unknown model" when it is no diffusers directory
    return cfg["num_attention_heads"] * cfg["attention_head_dim"] < 256


def generation_defaults(model_dir: str | Path) -> dict[str, int]:
    """Sampling steps / size when not given: the pretrained toy model its own (blockskip_toy.json: 20 steps at
    32 px, the size it was trained at), tiny test models a cheap 4 steps at 64 px, real models FLUX.1-dev's
    usual 28 steps at 512 px."""
    import json

    toy = Path(model_dir) / "blockskip_toy.json"
    if toy.is_file():
        d = json.loads(toy.read_text())
        return {"steps": int(d["sample_steps"]), "resolution": int(d["resolution"])}
    return dict(TINY_DEFAULTS if is_tiny_model(model_dir) else FULL_DEFAULTS)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def generate(pipe, prompt: str, seed: int, steps: int, size: int, blocks: frozenset[int] | set[int] = frozenset(),
             guidance: float | None = None) -> Image.Image:
    """The same seed gives the same initial noise, so masked and unmasked generations differ only by the mask."""
    extra = {"use_resolution_binning": False} if type(pipe).__name__ == "SanaPipeline" else {}
    extra.update(generation_kwargs(pipe))
    if guidance is not None:
        extra["guidance_scale"] = guidance
    g = torch.Generator("cpu").manual_seed(int(seed))
    with torch.no_grad(), masked(pipe.transformer, set(blocks)):
        return pipe(prompt, num_inference_steps=steps, height=size, width=size, generator=g, **extra).images[0]


class ProbeWorker:
    def __init__(self, model_dir: str, dino: str, device: str = "auto"):
        self.device = pick_device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.pipe = load_pipeline(model_dir, self.device, dtype)
        self.dino = DinoEmbedder(dino, self.device)
        self._adapter: str | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="blockskip-probe-")

    def use_adapter(self, files: AdapterFiles | None) -> None:
        digest = adapter_digest(files)
        if digest == self._adapter:
            return
        if self._adapter is not None:
            self.pipe.unload_lora_weights()  # back to the exact base weights
        if files:
            d = Path(self._tmp.name) / digest
            d.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (d / Path(name).name).write_bytes(data)
            self.pipe.load_lora_weights(str(d))
        self._adapter = digest

    def embed(self, prompt: str, seed: int, blocks: frozenset[int], steps: int, size: int,
              adapter: AdapterFiles | None = None) -> list[float]:
        """DINO embedding of one generation (a short list: cheap to ship back to the driver)."""
        self.use_adapter(adapter)
        image = generate(self.pipe, prompt, seed, steps, size, blocks)
        return self.dino.embed([image])[0].tolist()


__all__ = ["ProbeWorker", "generate", "adapter_files", "adapter_digest", "AdapterFiles"]

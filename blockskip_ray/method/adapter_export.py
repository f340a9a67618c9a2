"""Self-describing adapter directories that load wherever FLUX/SANA LoRAs are loaded.

An adapter directory holds:
- ``pytorch_lora_weights.safetensors``: diffusers' LoRA format (``transformer.<module>.lora_A/B.weight``),
  plus one ``transformer.<module>.alpha`` scalar per module: the kohya/ComfyUI convention (ComfyUI looks
  up ``{key}.alpha`` beside ``{key}.lora_B.weight``; diffusers' FLUX loader pops ``*.alpha`` into
  ``network_alphas``), so every loader applies the trained scale alpha / rank. The header's ``__metadata__``
  holds the whole training config under ``blockskip`` (JSON) and kohya's ``ss_network_dim/alpha``.
  diffusers' own ``lora_adapter_metadata`` key is left out on purpose: diffusers refuses a file that has
  both it and ``.alpha`` tensors.
- ``adapter_model.safetensors`` + ``adapter_config.json``: the same weights for ``PeftModel.from_pretrained``.
- ``README.md``: a short model card.

Every file is a pure function of the tensors and the config: JSON with sorted keys, tensors in sorted order,
and safetensors written here (the safetensors library serializes ``__metadata__`` from a Rust HashMap, whose
order changes between processes), so equal adapters are equal bytes whichever process wrote them.
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import __version__

WEIGHTS = "pytorch_lora_weights.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_BASE_VERSION = {"flux": "flux1", "sana": "sana"}


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter was trained from and with (nothing that differs between runs: no paths, no times)."""

    family: str
    base_model: str  # the model directory's name, e.g. "FLUX.1-dev" (not the local path)
    base_model_key: str  # name + fingerprint of the weights (features.stored.model_key)
    prompt: str
    skip: tuple[int, int]
    num_blocks: int
    mode: str
    steps: int
    resolution: int
    s_max: int | None
    rank: int
    alpha: float
    targets: str
    lr: float
    seed: int

    def to_json(self) -> dict:
        return asdict(self) | {"skip": list(self.skip), "kept_blocks": [self.skip[0], self.num_blocks - self.skip[1] - 1],
                               "project": "blockskip-ray", "project_version": __version__}


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format (8-byte header length, JSON header, raw little-endian data), deterministically."""
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _DTYPES:
            raise ValueError(f"tensor {name}: unsupported dtype {t.dtype}")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for c in chunks:
            f.write(c)
    tmp.replace(path)


def _modules(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.split(".lora_")[0] for k in state})


def export_adapter(out_dir: str | Path, state: dict[str, torch.Tensor], info: AdapterInfo) -> Path:
    """Write the adapter directory from peft-named LoRA tensors (``<module>.lora_A.weight``); returns the
    diffusers weights file. `pipe.load_lora_weights(out_dir)` and `PeftModel.from_pretrained(transformer,
    out_dir)` both load it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    modules = _modules(state)
    training = json.dumps(info.to_json(), sort_keys=True)
    meta = {"format": "pt", "blockskip": training, "ss_network_dim": str(info.rank),
            "ss_network_alpha": _num(info.alpha), "ss_base_model_version": _BASE_VERSION.get(info.family, info.family)}
    diffusers_sd = {f"transformer.{k}": v for k, v in state.items()}
    diffusers_sd |= {f"transformer.{m}.alpha": torch.tensor(float(info.alpha)) for m in modules}
    save_safetensors(out / WEIGHTS, diffusers_sd, meta)
    save_safetensors(out / PEFT_WEIGHTS, {f"base_model.model.{k}": v for k, v in state.items()},
                     {"format": "pt", "blockskip": training})
    (out / PEFT_CONFIG).write_text(json.dumps(_peft_config(info, modules), indent=1, sort_keys=True) + "\n")
    (out / "README.md").write_text(model_card(info, len(modules)))
    return out / WEIGHTS


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _peft_config(info: AdapterInfo, modules: list[str]) -> dict:
    from peft import LoraConfig

    cfg = LoraConfig(r=info.rank, lora_alpha=info.alpha, target_modules=modules, init_lora_weights=True,
                     base_model_name_or_path=info.base_model, inference_mode=True).to_dict()
    # sets -> sorted lists (a set's order follows string hashing, which changes between processes)
    cfg = {k: (sorted(v) if isinstance(v, (set, frozenset)) else v) for k, v in cfg.items()}
    return json.loads(json.dumps(cfg, default=str))


def read_training_metadata(weights_file: str | Path) -> dict:
    """The ``blockskip`` training config from an adapter's safetensors header."""
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="pt") as f:
        meta = f.metadata() or {}
    if "blockskip" not in meta:
        raise ValueError(f"{weights_file}: no blockskip training metadata in the safetensors header")
    return json.loads(meta["blockskip"])


def model_card(info: AdapterInfo, n_modules: int) -> str:
    kept = f"{info.skip[0]}..{info.num_blocks - info.skip[1] - 1}"
    pipe = {"flux": "FluxPipeline", "sana": "SanaPipeline"}.get(info.family, "DiffusionPipeline")
    return f"""---
base_model: {info.base_model}
library_name: diffusers
tags: [text-to-image, lora, diffusers, {info.family}, blockskip]
instance_prompt: {json.dumps(info.prompt)}
---
# LoRA for {info.base_model} (DiT-BlockSkip)

Trigger prompt: `{info.prompt}`

Trained by blockskip-ray {__version__} with DiT-BlockSkip: LoRA on blocks {kept} of {info.num_blocks}
(skip n={info.skip[0]}, m={info.skip[1]}), mode {info.mode}, {info.steps} steps at {info.resolution} px,
rank {info.rank}, alpha {_num(info.alpha)} (scale {info.alpha / info.rank:g}), targets {info.targets}
({n_modules} modules), lr {info.lr:g}, seed {info.seed}. The full config is in the safetensors header
(`blockskip` key).

```python
from diffusers import {pipe}
pipe = {pipe}.from_pretrained("{info.base_model}")
pipe.load_lora_weights("path/to/this/directory")
image = pipe({json.dumps(info.prompt)}).images[0]
```

Files: `{WEIGHTS}` (diffusers; per-module `.alpha` for ComfyUI/kohya loaders),
`{PEFT_WEIGHTS}` + `{PEFT_CONFIG}` (`PeftModel.from_pretrained`).
"""


__all__ = ["AdapterInfo", "export_adapter", "read_training_metadata", "save_safetensors", "WEIGHTS"]

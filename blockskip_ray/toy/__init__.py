"""The toy domain and the small models pretrained on it (design section 8).

`toy:flux` names the pretrained toy FLUX pipeline shipped in the package (toy/weights/flux, rebuilt by
`python -m blockskip_ray.toy.pretrain`); `toy:dino` / `toy:clip` the metric models (toy/weights/metrics,
rebuilt by `python -m blockskip_ray.toy.metric_models`).
"""
from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).resolve().parent / "weights"
TOY_MODELS = {"toy:flux": WEIGHTS / "flux", "toy:dino": WEIGHTS / "metrics" / "dino",
              "toy:clip": WEIGHTS / "metrics" / "clip"}
REBUILD = {"toy:flux": "python -m blockskip_ray.toy.pretrain --out {dir}",
           "toy:dino": "python -m blockskip_ray.toy.metric_models --out {parent}",
           "toy:clip": "python -m blockskip_ray.toy.metric_models --out {parent}"}


def is_toy_id(name: str) -> bool:
    return str(name).startswith("toy:")


def toy_model_dir(name: str) -> Path:
    """The shipped directory of a toy model id; a clear error for an unknown id or missing weights."""
    if name not in TOY_MODELS:
        raise ValueError(f"unknown toy model {name!r}: expected one of {sorted(TOY_MODELS)}")
    d = TOY_MODELS[name]
    marker = d / ("model_index.json" if name == "toy:flux" else "config.json")
    if not marker.is_file():
        raise FileNotFoundError(f"{name}: the shipped weights are missing from {d}; rebuild them with "
                                f"`{REBUILD[name].format(dir=d, parent=d.parent)}`")
    return d


def resolve_model_arg(model: str) -> str:
    """A --model / job `model:` value as a local directory: toy ids resolve to the shipped weights, anything
    else is returned unchanged (hub ids are not resolved: callers reject what is not a local directory)."""
    return str(toy_model_dir(model)) if is_toy_id(model) else model


__all__ = ["toy_model_dir", "resolve_model_arg", "is_toy_id", "TOY_MODELS"]

"""Timestep-aware dynamic patch sampling and the training plan (design section 2; paper Sec. 3.1).

crop side s(t) = s_min + (t / T) * (s_max - s_min), rounded to the pixel multiple (16 for FLUX: VAE
factor 8 x 2x2 patch), crop position uniform in the image, crop resized to s_min x s_min. High noise sees
a large crop (global structure), low noise a small one (detail).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

PLAN_COLUMNS = ("step", "image_index", "sigma", "t", "crop_x", "crop_y", "crop_size", "out_size", "flip", "noise_seed")
SAMPLINGS = ("dynamic", "resize")


def crop_side(sigma: float, s_min: int, s_max: int, multiple: int = 16) -> int:
    """s(t) rounded to `multiple`, kept inside [s_min, largest multiple <= s_max]."""
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"sigma must be in [0, 1], got {sigma}")
    check_sizes(s_min, s_max, multiple)
    raw = s_min + sigma * (s_max - s_min)
    side = int(round(raw / multiple)) * multiple
    return max(s_min, min(side, (s_max // multiple) * multiple))


def check_sizes(s_min: int, s_max: int, multiple: int) -> None:
    if s_min <= 0 or s_min % multiple:
        raise ValueError(f"s_min (resolution) must be a positive multiple of {multiple}, got {s_min}")
    if s_max < s_min:
        raise ValueError(f"s_min ({s_min}) must not exceed s_max ({s_max})")


@dataclass(frozen=True)
class PlanConfig:
    steps: int
    s_min: int
    s_max: int | None = None  # None: each image's shorter side, capped at s_max_cap
    s_max_cap: int = 1024
    sampling: str = "dynamic"  # dynamic | resize (the whole image, center square, resized to s_min)
    timesteps: str = "uniform"  # uniform | logit_normal (SD3-style, mean 0 std 1)
    flip_prob: float = 0.0
    seed: int = 0


def subject_seed(subject_id: str, seed: int) -> int:
    # A stable hash (not Python's salted hash): the plan is a pure function of (subject, config, seed).
    return int.from_bytes(hashlib.sha256(f"{seed}:{subject_id}".encode()).digest()[:8], "little")


def build_plan(subject_id: str, image_sizes: list[tuple[int, int]], cfg: PlanConfig, multiple: int = 16) -> list[dict]:
    """One row per step: image, sigma, crop box, flip, noise seed. `image_sizes` are (width, height)."""
    if cfg.steps <= 0:
        raise ValueError(f"steps must be positive, got {cfg.steps}")
    if not image_sizes:
        raise ValueError("a subject needs at least one image")
    if cfg.sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {cfg.sampling!r}: expected one of {SAMPLINGS}")
    for i, (w, h) in enumerate(image_sizes):
        if min(w, h) < cfg.s_min:
            raise ValueError(f"image {i} is {w}x{h}, smaller than s_min={cfg.s_min}")
        if cfg.s_max is not None and cfg.sampling == "dynamic" and min(w, h) < cfg.s_max:
            raise ValueError(f"image {i} is {w}x{h}, smaller than s_max={cfg.s_max}")
    check_sizes(cfg.s_min, cfg.s_max if cfg.s_max is not None else max(cfg.s_min, cfg.s_max_cap), multiple)
    rng = np.random.default_rng(subject_seed(subject_id, cfg.seed))
    rows = []
    for step in range(cfg.steps):
        idx = int(rng.integers(len(image_sizes)))
        w, h = image_sizes[idx]
        if cfg.timesteps == "uniform":
            sigma = float(rng.random())
        elif cfg.timesteps == "logit_normal":
            sigma = float(1 / (1 + np.exp(-rng.normal())))
        else:
            raise ValueError(f"unknown timestep sampling {cfg.timesteps!r}")
        if cfg.sampling == "dynamic":
            s_max = cfg.s_max if cfg.s_max is not None else min(min(w, h), cfg.s_max_cap)
            side = crop_side(sigma, cfg.s_min, s_max, multiple)
            x, y = int(rng.integers(w - side + 1)), int(rng.integers(h - side + 1))
        else:
            side = min(w, h)
            x, y = (w - side) // 2, (h - side) // 2
            rng.integers(2), rng.integers(2)  # keep the stream aligned with the dynamic plan
        flip = bool(rng.random() < cfg.flip_prob)
        rows.append(dict(step=step, image_index=idx, sigma=sigma, t=sigma * 1000.0, crop_x=x, crop_y=y,
                         crop_size=side, out_size=cfg.s_min, flip=flip, noise_seed=int(rng.integers(2**31 - 1))))
    return rows

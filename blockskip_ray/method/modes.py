"""Training modes: the method and the ablation baselines run by the same trainer (paper Tables 1, 3)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str
    skips: bool  # train only the kept blocks
    features: bool  # leading state + trailing delta from the frozen model (False: HollowedNet-style naive skip)
    sampling: str  # dynamic | resize


MODES = {
    # plain LoRA on every block, the whole image resized to --resolution (the paper's LoRA-512 baseline)
    "lora": Mode("lora", skips=False, features=False, sampling="resize"),
    # block skipping with features, the whole image resized to s_min (no dynamic crop): isolates patch sampling
    "resize": Mode("resize", skips=True, features=True, sampling="resize"),
    # block skipping without precomputed features: skipped blocks simply dropped (paper: DINO 0.73 -> 0.43)
    "naive-skip": Mode("naive-skip", skips=True, features=False, sampling="dynamic"),
    "blockskip": Mode("blockskip", skips=True, features=True, sampling="dynamic"),
}


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"unknown mode {name!r}: expected one of {sorted(MODES)}")
    return MODES[name]


def check_skip(skip: tuple[int, int], num_blocks: int) -> tuple[int, int]:
    n, m = skip
    if n < 0 or m < 0:
        raise ValueError(f"skip counts must be >= 0, got {n},{m}")
    if n + m >= num_blocks:
        raise ValueError(f"skip plan {n},{m} leaves no block to train (the model has {num_blocks} blocks)")
    return n, m


def default_split(ratio: float, num_blocks: int) -> tuple[int, int]:
    """The documented default when no selection table exists: k = round(ratio * N), split evenly, the
    odd block skipped at the front. The paper finds trailing blocks more critical than leading ones
    (Table 3: skipping the last 50% collapses DINO to 0.48, the first 50% only to 0.67), so the front
    takes the extra block."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"skip ratio must be in [0, 1), got {ratio}")
    k = round(ratio * num_blocks)
    k = min(k, num_blocks - 1)
    return (k + 1) // 2, k // 2

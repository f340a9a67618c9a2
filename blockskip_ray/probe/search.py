"""The block-selection search (paper Sec. 3.3), as pure logic over masked block sets and distances.

(a) Profile: mask a window of W consecutive blocks at every start s = 0 .. N-W; its distance from the
    unmasked generation is the importance of the blocks [s, s+W).
(b) Splits: for each skip budget k = round(ratio * N), mask the first n and the last m blocks together
    for every n + m = k; (n*, m*) = the split with the smallest distance.
Distance = 1 - cos(DINO(masked), DINO(unmasked)) for the same subject, prompt and seed, averaged over
all probe samples (subject x prompt x seed). Generation itself happens elsewhere (the Ray layer):
this module only says which masked sets to generate and turns embeddings into the table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Mapping, Sequence

import torch

AUTO_WINDOW_FULL = 14  # the paper's window on FLUX (57 blocks)


def resolve_window(window: int | str | None, num_blocks: int) -> int:
    """'auto' (or None): 14 when N >= 28 (the paper's W on FLUX.1), else max(1, N // 3), so small
    models (SANA-1600M: 20 blocks -> 6; the tiny FLUX: 9 -> 3) still get several windows. An explicit W
    is used as given and must fit."""
    if window is None or window == "auto":
        return AUTO_WINDOW_FULL if num_blocks >= 2 * AUTO_WINDOW_FULL else max(1, num_blocks // 3)
    w = int(window)
    if w < 1:
        raise ValueError(f"window must be >= 1, got {w}")
    if w > num_blocks:
        raise ValueError(f"window {w} larger than the block count {num_blocks}")
    return w


def ratio_key(ratio: float) -> str:
    """The selection table's key for a skip ratio ('0.3', '0.5'): exact lookups compare these strings."""
    return f"{float(ratio):.6g}"


def budget(ratio: float, num_blocks: int) -> int:
    """k = round(ratio * N) skipped blocks (the same rounding as `default_split`)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"skip ratio must be in [0, 1), got {ratio}")
    k = round(ratio * num_blocks)
    if k >= num_blocks:
        raise ValueError(f"skip ratio {ratio} skips {k} of {num_blocks} blocks and leaves none to train")
    return k


def split_blocks(n: int, m: int, num_blocks: int) -> frozenset[int]:
    return frozenset(range(n)) | frozenset(range(num_blocks - m, num_blocks))


def window_blocks(start: int, window: int) -> frozenset[int]:
    return frozenset(range(start, start + window))


@dataclass
class ProbePlan:
    num_blocks: int
    window: int
    ratios: list[float]
    budgets: dict[str, int]  # ratio key -> k
    starts: list[int] = field(init=False)
    splits: dict[str, list[tuple[int, int]]] = field(init=False)

    def __post_init__(self) -> None:
        self.starts = list(range(self.num_blocks - self.window + 1))
        self.splits = {r: [(n, k - n) for n in range(k + 1)] for r, k in self.budgets.items()}

    def masked_sets(self) -> list[frozenset[int]]:
        """Every distinct masked set to generate, the unmasked reference (empty set) first.
        Windows and splits can coincide (window at 0 == split (W, 0)); each is generated once."""
        sets: list[frozenset[int]] = [frozenset()]
        sets += [window_blocks(s, self.window) for s in self.starts]
        for r in self.budgets:
            sets += [split_blocks(n, m, self.num_blocks) for n, m in self.splits[r]]
        return list(dict.fromkeys(sets))

    def generations_per_sample(self) -> dict[str, int]:
        """Counts without sharing (the docs' formula) and with it (what actually runs)."""
        naive = 1 + len(self.starts) + sum(len(v) for v in self.splits.values())
        return {"naive": naive, "unique": len(self.masked_sets())}


def make_plan(num_blocks: int, ratios: Sequence[float], window: int | str | None = "auto") -> ProbePlan:
    if not ratios:
        raise ValueError("give at least one skip ratio")
    w = resolve_window(window, num_blocks)
    budgets = {ratio_key(r): budget(float(r), num_blocks) for r in ratios}
    return ProbePlan(num_blocks, w, [float(r) for r in ratios], budgets)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(1.0 - torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def mean_distances(embeddings: Mapping[tuple[Hashable, frozenset[int]], torch.Tensor]) -> dict[frozenset[int], float]:
    """embeddings[(sample, masked_set)] -> mean over samples of 1 - cos(masked, the sample's reference)."""
    samples = sorted({s for s, _ in embeddings}, key=repr)
    sets = {b for _, b in embeddings if b}
    out: dict[frozenset[int], float] = {frozenset(): 0.0}
    for b in sets:
        missing = [s for s in samples if (s, b) not in embeddings or (s, frozenset()) not in embeddings]
        if missing:
            raise ValueError(f"masked set {sorted(b)} lacks embeddings for samples {missing[:3]}")
        out[b] = sum(cosine_distance(embeddings[(s, b)], embeddings[(s, frozenset())]) for s in samples) / len(samples)
    return out


def best_split(scored: Sequence[tuple[int, int, float]]) -> tuple[int, int]:
    """argmin over (n, m, distance); ties go to the larger n (the paper finds trailing blocks more critical
    than leading ones, so at equal cost keep the trailing ones)."""
    n, m, _ = min(scored, key=lambda t: (t[2], -t[0]))
    return n, m


def summarize(plan: ProbePlan, distances: Mapping[frozenset[int], float]) -> dict:
    """The selection document's search part: table, raw distances per split and per window."""
    profile = [{"start": s, "blocks": [s, s + plan.window - 1], "distance": distances[window_blocks(s, plan.window)]}
               for s in plan.starts]
    splits, table = {}, {}
    for r, pairs in plan.splits.items():
        scored = [(n, m, distances[split_blocks(n, m, plan.num_blocks)]) for n, m in pairs]
        splits[r] = [{"n": n, "m": m, "distance": d} for n, m, d in scored]
        table[r] = list(best_split(scored))
    return {"table": table, "budgets": dict(plan.budgets), "splits": splits, "profile": profile,
            "window": plan.window, "num_blocks": plan.num_blocks}


__all__ = ["resolve_window", "ratio_key", "budget", "split_blocks", "window_blocks", "ProbePlan", "make_plan",
           "cosine_distance", "mean_distances", "best_split", "summarize"]

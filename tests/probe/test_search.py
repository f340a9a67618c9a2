"""Split search and selection table logic with a fake distance (no generation)."""
from __future__ import annotations

import json

import pytest
import torch

from blockskip_ray.probe.search import (best_split, budget, make_plan, mean_distances, ratio_key, resolve_window,
                                        split_blocks, summarize)


def test_window_resolution():
    assert resolve_window("auto", 57) == 14
    assert resolve_window("auto", 28) == 14
    assert resolve_window("auto", 20) == 6
    assert resolve_window("auto", 9) == 3
    assert resolve_window("auto", 2) == 1
    assert resolve_window(5, 9) == 5
    with pytest.raises(ValueError, match="window 10 larger than the block count 9"):
        resolve_window(10, 9)
    with pytest.raises(ValueError, match=">= 1"):
        resolve_window(0, 9)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        budget(ratio, 57)


def test_ratio_that_skips_everything():
    with pytest.raises(ValueError, match="leaves none"):
        budget(0.97, 9)  # round(8.73) = 9 blocks


def test_plan_sets_and_counts_flux_dev():
    plan = make_plan(57, [0.3, 0.5])
    assert plan.window == 14 and plan.starts == list(range(44))
    assert plan.budgets == {"0.3": 17, "0.5": 28}  # round(17.1), round(28.5) (banker's rounding, as default_split)
    counts = plan.generations_per_sample()
    assert counts["naive"] == 1 + 44 + 18 + 29
    sets = plan.masked_sets()
    assert sets[0] == frozenset() and len(sets) == len(set(sets)) == counts["unique"]
    assert counts["unique"] == counts["naive"]  # no split of 17 or 28 blocks equals a 14-block window


def test_shared_sets_are_generated_once():
    plan = make_plan(9, [0.3], window=3)  # k = 3: splits (3, 0) and (0, 3) are the windows at 0 and 6
    assert split_blocks(3, 0, 9) in plan.masked_sets()
    assert plan.generations_per_sample() == {"naive": 1 + 7 + 4, "unique": 1 + 7 + 4 - 2}


def fake_importance(num_blocks: int):
    """A model whose middle blocks matter: masking block i costs w(i), costs add up."""
    w = [1.0 - abs(i - (num_blocks - 1) * 0.45) / num_blocks for i in range(num_blocks)]
    return lambda blocks: sum(w[i] for i in blocks), w


def test_search_finds_argmin_of_fake_distance():
    n_blocks = 20
    dist, w = fake_importance(n_blocks)
    plan = make_plan(n_blocks, [0.3, 0.5], window=4)
    d = {b: dist(b) for b in plan.masked_sets()}
    doc = summarize(plan, d)
    for r, k in plan.budgets.items():
        brute = min(((n, k - n) for n in range(k + 1)), key=lambda nm: (dist(split_blocks(*nm, n_blocks)), -nm[0]))
        assert tuple(doc["table"][r]) == brute
        assert len(doc["splits"][r]) == k + 1
    prof = [p["distance"] for p in doc["profile"]]
    assert max(range(len(prof)), key=prof.__getitem__) in (6, 7)  # peak around block 0.45 * 19
    json.dumps(doc)  # the document is plain JSON


def test_tie_prefers_leading_skip():
    assert best_split([(0, 2, 0.1), (1, 1, 0.1), (2, 0, 0.1)]) == (2, 0)
    assert best_split([(0, 2, 0.05), (1, 1, 0.1), (2, 0, 0.1)]) == (0, 2)


def test_mean_distances_per_sample_reference():
    e = torch.eye(3)
    a, b = frozenset(), frozenset({1})
    emb = {("s1", a): e[0], ("s1", b): e[0], ("s2", a): e[1], ("s2", b): e[2]}
    d = mean_distances(emb)
    assert d[a] == 0.0 and d[b] == pytest.approx(0.5)  # s1 identical (0), s2 orthogonal (1)
    del emb[("s2", b)]
    with pytest.raises(ValueError, match="lacks embeddings"):
        mean_distances(emb)


def test_ratio_key_is_stable():
    assert ratio_key(0.3) == "0.3" == ratio_key(0.30000000001)
    assert ratio_key(0.5) != ratio_key(0.45)

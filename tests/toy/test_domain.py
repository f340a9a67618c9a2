"""The toy domain: deterministic from a seed; held-out identities never in pretraining, their parts are."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np

from blockskip_ray.toy.domain import (HELD_OUT, PRETRAIN_IDENTITIES, caption, eval_prompts, pretraining_sample,
                                      random_scene, render_toy, subject_images, subject_prompt)


def test_pretraining_stream_is_deterministic_and_varied():
    a = [pretraining_sample(3, i) for i in range(6)]
    b = [pretraining_sample(3, i) for i in range(6)]
    for (ia, ca, xa), (ib, cb, xb) in zip(a, b):
        assert ca == cb and xa == xb
        assert np.array_equal(np.asarray(ia), np.asarray(ib))
    assert len({c for _, c, _ in a}) > 1  # not one image repeated
    other = pretraining_sample(4, 0)
    assert not np.array_equal(np.asarray(other[0]), np.asarray(a[0][0]))
    assert a[0][0].size == (32, 32)


def test_held_out_identities_never_in_pretraining_but_their_parts_are():
    held = set(HELD_OUT)
    assert held.isdisjoint(PRETRAIN_IDENTITIES)
    assert all(pretraining_sample(0, i)[2] not in held for i in range(400))
    for ident in HELD_OUT:
        for field, value in asdict(ident).items():
            assert any(getattr(p, field) == value for p in PRETRAIN_IDENTITIES), (field, value)
        # its full description is a caption no pretraining image can have
        assert all(p.describe() != ident.describe() for p in PRETRAIN_IDENTITIES)


def test_subject_images_show_the_same_toy_in_different_scenes():
    a, b = subject_images(0, n=3), subject_images(0, n=3)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))
    assert not np.array_equal(np.asarray(subject_images(1, n=1)[0]), np.asarray(a[0]))


def test_captions_name_the_parts_and_the_background():
    rng = np.random.default_rng(0)
    scene = random_scene(rng)
    ident = HELD_OUT[0]
    c = caption(ident, scene)
    for word in (ident.color, ident.shape, ident.accessory, ident.acc_color, scene.background):
        assert word in c.split()
    assert caption(ident, scene, {"toy": False}).startswith("a toy on a ")
    assert caption(ident, scene, {"background": False}) == f"a {ident.describe()}"
    assert all(subject_prompt().split()[1] in p for p in eval_prompts())
    # rendering depends on the identity: a different accessory colour changes pixels
    other = type(ident)(**{**asdict(ident), "acc_color": "green"})
    assert not np.array_equal(np.asarray(render_toy(ident, scene)), np.asarray(render_toy(other, scene)))

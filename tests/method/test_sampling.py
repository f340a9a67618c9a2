"""Dynamic patch sampling: the crop-size formula, 16-px rounding, bounds, and a deterministic plan."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockskip_ray.method.sampling import PlanConfig, build_plan, crop_side


@settings(max_examples=300, deadline=None)
@given(sigma=st.floats(0, 1), s_min_k=st.integers(1, 32), extra=st.integers(0, 2000))
def test_crop_side_bounds_and_rounding(sigma, s_min_k, extra):
    s_min = 16 * s_min_k
    s_max = s_min + extra
    side = crop_side(sigma, s_min, s_max)
    assert side % 16 == 0
    assert s_min <= side <= s_max
    raw = s_min + sigma * (s_max - s_min)
    top = (s_max // 16) * 16
    if side == top and raw > top:
        assert raw - side < 16  # clamped to the largest multiple of 16 inside s_max
    else:
        assert abs(side - raw) <= 8  # the NEAREST multiple of 16 (design section 2), not floor or ceil


@settings(max_examples=100, deadline=None)
@given(a=st.floats(0, 1), b=st.floats(0, 1))
def test_crop_side_monotone_in_noise(a, b):
    lo, hi = min(a, b), max(a, b)
    assert crop_side(lo, 256, 1024) <= crop_side(hi, 256, 1024)


@pytest.mark.parametrize("raw,expected", [(263, 256), (265, 272), (279, 272), (281, 288), (300, 304)])
def test_crop_side_rounds_to_nearest_multiple(raw, expected):
    # s_min=256, s_max=512: raw = 256 + sigma * 256. Floor rounding gives 256/256/272/272/288 here.
    assert crop_side((raw - 256) / 256, 256, 512) == expected


def test_crop_side_endpoints():
    assert crop_side(0.0, 256, 1024) == 256 and crop_side(1.0, 256, 1024) == 1024
    assert crop_side(1.0, 256, 500) == 496  # largest multiple of 16 inside s_max
    assert crop_side(0.5, 256, 512) == 384


@pytest.mark.parametrize("args,msg", [((0.5, 250, 512), "multiple of 16"), ((0.5, 512, 256), "must not exceed"),
                                      ((1.5, 256, 512), "sigma")])
def test_crop_side_errors(args, msg):
    with pytest.raises(ValueError, match=msg):
        crop_side(*args)


def test_plan_is_pure_function_of_subject_config_seed():
    sizes = [(512, 640), (700, 512), (512, 512)]
    cfg = PlanConfig(steps=50, s_min=256)
    a, b = build_plan("toy-1", sizes, cfg), build_plan("toy-1", sizes, cfg)
    assert a == b
    assert a != build_plan("toy-2", sizes, cfg) and a != build_plan("toy-1", sizes, PlanConfig(steps=50, s_min=256, seed=1))
    for r in a:
        w, h = sizes[r["image_index"]]
        assert r["crop_size"] == crop_side(r["sigma"], 256, min(w, h))
        assert 0 <= r["crop_x"] <= w - r["crop_size"] and 0 <= r["crop_y"] <= h - r["crop_size"]
        assert r["out_size"] == 256


def test_resize_plan_takes_the_whole_image():
    rows = build_plan("s", [(300, 200)], PlanConfig(steps=3, s_min=64, sampling="resize"))
    assert {(r["crop_x"], r["crop_y"], r["crop_size"]) for r in rows} == {(50, 0, 200)}


@pytest.mark.parametrize("sizes,cfg,msg", [
    ([(100, 300)], PlanConfig(steps=2, s_min=128), "smaller than s_min"),
    ([], PlanConfig(steps=2, s_min=128), "at least one image"),
    ([(512, 512)], PlanConfig(steps=2, s_min=120), "multiple of 16"),
    ([(512, 512)], PlanConfig(steps=2, s_min=256, s_max=128), "must not exceed"),
    ([(512, 512)], PlanConfig(steps=0, s_min=256), "steps"),
])
def test_plan_errors(sizes, cfg, msg):
    with pytest.raises(ValueError, match=msg):
        build_plan("s", sizes, cfg)

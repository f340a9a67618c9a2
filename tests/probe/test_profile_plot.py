"""profile.png: a readable PNG (title, axis titles, grid) with one bar row per chosen split."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from blockskip_ray.probe.selection import draw_profile

DOC = {"model_key": "toy-abc", "num_blocks": 12, "window": 4, "table": {"0.3": [3, 1], "0.5": [4, 2]},
       "profile": [{"start": s, "distance": 0.01 * (s + 1)} for s in range(9)]}


def test_profile_png_draws_splits_where_the_table_says():
    im = np.asarray(Image.open(io.BytesIO(draw_profile(DOC, note="toy model"))).convert("RGB"))
    assert im.shape == (460, 760, 3)
    left, right, top, bottom = 90, 24, 76, 120

    def bx(t):  # block index -> x pixel
        return int(left + (760 - left - right) * t / 11)

    red, green = (214, 39, 40), (44, 160, 44)
    row = lambda j: 460 - bottom + 44 + 16 * j  # noqa: E731
    is_c = lambda px, c: tuple(px) == c  # noqa: E731
    # ratio 0.3 skips blocks 0..2 and 11; block 5 is kept
    assert is_c(im[row(0), bx(1)], red) and is_c(im[row(0), bx(11) - 1], red) and not is_c(im[row(0), bx(5)], red)
    # ratio 0.5 skips 0..3 and 10..11
    assert is_c(im[row(1), bx(3)], green) and is_c(im[row(1), bx(10)], green) and not is_c(im[row(1), bx(6)], green)
    # a grid: light grey lines inside the plot area
    assert (im[top + 5:460 - bottom, left + 5:760 - right] == (225, 225, 225)).all(-1).any()

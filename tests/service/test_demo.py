"""The demo's drawing: each returned box outlined where it lies on the image, one panel per answer."""

from __future__ import annotations

import numpy as np
from PIL import Image

from serve.app.demo import PANEL, draw_answers, red_disc


def test_each_box_is_drawn_where_it_lies(tmp_path):
    disc = {"phrase": "a red shape", "boxes_px": [[60.0, 40.0, 240.0, 240.0]]}
    answers = [
        {"task": "caption", "text": None, "region": None, "content": "An image of a red shape", "entities": [disc]},
        {"task": "describe_region", "text": None, "region": [0.5, 0.5, 1.0, 1.0], "content": "It", "entities": []},
    ]
    sheet = np.asarray(Image.open(draw_answers(red_disc(), answers, tmp_path / "demo.png")))
    scale = PANEL / 480  # the 480x320 picture shown 360 pixels wide, at (10, 10)
    green = (sheet[..., 1] > 150) & (sheet[..., 0] < 80) & (sheet[..., 2] < 80)
    rows, cols = np.nonzero(green[: 10 + round(320 * scale), : PANEL + 10])
    assert abs(cols.min() - (10 + 60 * scale)) <= 2 and abs(cols.max() - (10 + 240 * scale)) <= 2
    assert abs(rows.min() - (10 + 40 * scale)) <= 2 and abs(rows.max() - (10 + 240 * scale)) <= 2
    second = green[:, PANEL + 20 :]
    assert not second.any()  # no entity in the second answer: no box
    blue = (sheet[..., 2] > 200) & (sheet[..., 0] < 50)
    assert blue[:, PANEL + 20 :].any() and not blue[:, : PANEL + 10].any()  # the region, dashed, in its panel

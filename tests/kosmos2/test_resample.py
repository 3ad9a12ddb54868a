"""The vectorized bicubic resize against Pillow's own: equal bytes for any size, either pass order, shrinking
or enlarging, photographs' smooth gradients and noise's extremes (which exercise the clipping)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from serve.kosmos2.resample import resize_bicubic, window_weights


def pillow(pixels: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC))


def image(height: int, width: int, seed: int, smooth: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if not smooth:
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    steps = rng.integers(-4, 5, (height, width, 3)).cumsum(axis=0).cumsum(axis=1) // 8
    return np.clip(steps + 128, 0, 255).astype(np.uint8)


@settings(max_examples=150, deadline=None)
@given(
    height=st.integers(1, 1500),
    width=st.integers(1, 1500),
    size=st.sampled_from([224, 7, 300]),
    seed=st.integers(0, 2**16),
    smooth=st.booleans(),
)
def test_bytes_equal_pillows(height, width, size, seed, smooth):
    pixels = image(height, width, seed, smooth)
    assert np.array_equal(resize_bicubic(Image.fromarray(pixels), size), pillow(pixels, size))


def test_the_processors_common_cases():
    """A landscape photograph (horizontal pass first), a portrait one shrinking in height more than twice as
    much (vertical first), one side already 224 (a single pass), and no change at all."""
    for height, width in ((480, 640), (1000, 300), (224, 500), (700, 224), (224, 224)):
        pixels = image(height, width, seed=height, smooth=True)
        assert np.array_equal(resize_bicubic(Image.fromarray(pixels), 224), pillow(pixels, 224)), (height, width)


def test_window_weights_sum_to_one_in_fixed_point():
    """640 -> 224: windows span the kernel widened by the scale (12 positions; the first cut at the edge), and
    their weights sum to 2**22 within rounding."""
    starts, counts, weights = window_weights(640, 224)
    assert starts[0] == 0 and counts[0] == 7 and counts.max() == 12 and starts[-1] + counts[-1] == 640
    assert np.all(np.abs(weights.sum(axis=1) - 2**22) <= counts)

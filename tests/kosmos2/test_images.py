"""Image decoding, conversion and resizing, against the Hugging Face processor; limits and bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from serve.app.config import LimitsConfig
from serve.engine.model import ModelGeometry
from serve.engine.reference import normalize_pixels
from serve.errors import InvalidImage, PayloadTooLarge
from serve.kosmos2.images import ImageLimits, prepare_image
from tests.helpers import LIMITS, bomb_png, encode, photo


def hf_pixels(loaded, image: Image.Image) -> torch.Tensor:
    return loaded.processor.image_processor(image, return_tensors="pt")["pixel_values"][0]


def our_pixels(loaded, data: bytes) -> torch.Tensor:
    prepared = prepare_image(data, LIMITS)
    batch = torch.from_numpy(prepared.pixels[None])
    return normalize_pixels(batch, ModelGeometry(loaded), torch.float32)[0]


def with_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, rgba.width, dtype=np.uint8), (rgba.height, 1))
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


CASES = {
    "png-rgb": (lambda: photo(320, 240), "PNG"),
    "jpeg-640x480": (lambda: photo(640, 480, seed=1), "JPEG"),
    "webp": (lambda: photo(300, 500, seed=2), "WEBP"),
    "bmp": (lambda: photo(97, 61, seed=3), "BMP"),
    "png-gray": (lambda: photo(200, 200, seed=4).convert("L"), "PNG"),
    "png-rgba": (lambda: with_alpha(photo(256, 128, seed=5)), "PNG"),
    "png-palette": (lambda: photo(150, 150, seed=6).convert("P"), "PNG"),
    "gif": (lambda: photo(120, 90, seed=7).convert("P"), "GIF"),
    "tiny-1x1": (lambda: photo(1, 1, seed=8), "PNG"),
    "wide-900x30": (lambda: photo(900, 30, seed=9), "PNG"),
}


@pytest.mark.parametrize("name", CASES)
def test_pixels_equal_processor(loaded, name):
    make, fmt = CASES[name]
    data = encode(make(), fmt)
    decoded = Image.open(io.BytesIO(data))  # what a user of the processor would pass
    if "A" in decoded.getbands():  # transformers composites on white only since 5.2x; this test is the resize's
        white = Image.new("RGBA", decoded.size, (255, 255, 255, 255))
        decoded = Image.alpha_composite(white, decoded.convert("RGBA")).convert("RGB")
    expected = hf_pixels(loaded, decoded)
    ours = our_pixels(loaded, data)
    assert ours.shape == expected.shape == (3, 224, 224)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0), (ours - expected).abs().max()
    prepared = prepare_image(data, LIMITS)
    assert (prepared.width, prepared.height) == decoded.size
    assert prepared.pixels.dtype == np.uint8 and prepared.pixels.shape == (224, 224, 3)


def test_cmyk_and_16_bit_are_converted():
    cmyk = prepare_image(encode(photo(64, 48).convert("CMYK"), "JPEG"), LIMITS)
    assert cmyk.pixels.shape == (224, 224, 3) and (cmyk.width, cmyk.height) == (64, 48)
    deep = np.full((40, 50), 65535, dtype=np.uint16)
    deep[:, :25] = 257 * 100
    sixteen = prepare_image(encode(Image.fromarray(deep), "PNG"), LIMITS)
    assert sixteen.pixels[:, 0].tolist() == [[100, 100, 100]] * 224
    assert sixteen.pixels[:, -1].tolist() == [[255, 255, 255]] * 224


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert prepare_image(encode(clear, "PNG"), LIMITS).pixels.min() == 255


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (32, 32), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    pixels = prepare_image(buffer.getvalue(), LIMITS).pixels
    assert pixels[..., 0].min() > 200 and pixels[..., 2].max() < 50


def test_exif_orientation_is_applied():
    image = photo(80, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    prepared = prepare_image(encode(image, "JPEG", exif=exif), LIMITS)
    assert (prepared.width, prepared.height) == (40, 80)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not an image at all",
        encode(photo(), "PNG")[:300],
        encode(photo(), "JPEG")[:-2000],
        encode(photo(), "TIFF"),
    ],
    ids=["empty", "text", "truncated-png", "truncated-jpeg", "tiff"],
)
def test_bad_bytes_are_refused(data):
    with pytest.raises(InvalidImage):
        prepare_image(data, LIMITS)


def test_bombs_are_refused_before_decoding(monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for width, height in [(100_000, 100_000), (10_000, 6_000), (60_000, 60)]:
        with pytest.raises(InvalidImage) as info:
            prepare_image(bomb_png(width, height), LIMITS)
        assert "limit" in info.value.message
    with pytest.raises(PayloadTooLarge):
        prepare_image(b"x" * 101, ImageLimits(max_bytes=100, max_pixels=10**6, max_aspect_ratio=50, fast_jpeg=False))


def test_fast_jpeg_is_close_and_keeps_the_original_size():
    """The opt-in fast path decodes at a reduced scale: the pixels stay close, the reported size is the
    original one (boxes map to it), and other formats are untouched."""
    fast = LimitsConfig(fast_jpeg=True).image_limits()
    for seed in range(3):
        jpeg = encode(photo(900, 600, seed=seed), "JPEG", quality=92)
        exact, quick = prepare_image(jpeg, LIMITS), prepare_image(jpeg, fast)
        assert (quick.width, quick.height) == (exact.width, exact.height) == (900, 600)
        difference = np.abs(exact.pixels.astype(int) - quick.pixels.astype(int))
        assert 0 < difference.mean() < 2.0
    png = encode(photo(900, 600), "PNG")
    assert np.array_equal(prepare_image(png, fast).pixels, prepare_image(png, LIMITS).pixels)
    rotated = Image.Exif()
    rotated[0x0112] = 6
    turned = prepare_image(encode(photo(900, 600), "JPEG", exif=rotated), fast)
    assert (turned.width, turned.height) == (600, 900)

"""Image decoding, checks and the Kosmos-2 resize, on the CPU.

``prepare_image(data, limits)`` turns encoded bytes into the 224x224x3 uint8 array the model sees, made exactly as
the Kosmos-2 processor makes it (every image squashed to 224x224 with PIL's bicubic filter, whose arithmetic
``serve.kosmos2.resample`` repeats faster; transparency composited on white), plus the original width and height for
mapping boxes back. Normalization to the CLIP mean and standard deviation happens later, on the engine's device
(``serve.engine.normalize_pixels``).

Limits are checked from the header, before any pixel is decoded, so a decompression bomb costs nothing.
Unlike the Hugging Face processor, the EXIF orientation is applied, so boxes match the image as viewers
show it.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serve.errors import InvalidImage, PayloadTooLarge
from serve.kosmos2.resample import resize_bicubic

SIZE = 224
"""Side of the square model input."""

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
"""Encodings accepted; anything else is refused without trying other decoders."""


@dataclass(frozen=True)
class ImageLimits:
    """What an image may be: encoded size, decoded pixels, and shape (``LimitsConfig.image_limits()``)."""

    max_bytes: int
    max_pixels: int
    max_aspect_ratio: float
    fast_jpeg: bool
    """Decode JPEGs at a reduced scale (libjpeg's DCT scaling, still at least 224x224) before the resize: about
    1.8x faster than the exact path, but the pixels differ slightly from the processor's (README, "Performance")."""


@dataclass(frozen=True)
class PreparedImage:
    """The model input (224x224x3 uint8, RGB) and the original image's size."""

    pixels: np.ndarray
    width: int
    height: int


def prepare_image(data: bytes, limits: ImageLimits) -> PreparedImage:
    """Decode, check and resize one encoded image; raises :class:`InvalidImage` or :class:`PayloadTooLarge`."""
    if len(data) > limits.max_bytes:
        raise PayloadTooLarge(f"the image is {len(data)} bytes; the limit is {limits.max_bytes}", param="image_url")
    image, width, height = open_image(data, limits)
    return PreparedImage(resize(to_rgb(image)), width, height)


ROTATED = {5, 6, 7, 8}
"""EXIF orientations that turn the image a quarter, swapping its width and height."""


def open_image(data: bytes, limits: ImageLimits) -> tuple[Image.Image, int, int]:
    """The decoded first frame (EXIF orientation applied) and the original width and height as displayed;
    format and size are checked from the header first."""
    if not data:
        raise InvalidImage("the image is empty", param="image_url")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is ours
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise InvalidImage(
            f"the data is not an image in a supported format ({', '.join(FORMATS)})", param="image_url"
        ) from None
    except Image.DecompressionBombError:
        raise InvalidImage(
            f"the image declares far more pixels than the limit of {limits.max_pixels}", param="image_url"
        ) from None
    except Exception as exc:  # a corrupt header can raise almost anything inside Pillow's plugins
        raise InvalidImage(f"the image header cannot be read ({type(exc).__name__})", param="image_url") from None
    check_size(image.width, image.height, limits)
    try:
        width, height = image.size
        if image.getexif().get(0x0112) in ROTATED:
            width, height = height, width
        if limits.fast_jpeg and image.format == "JPEG":
            image.draft("RGB", (SIZE, SIZE))
        image.seek(0)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # not a copy: most images need no turn
        return image, width, height
    except Exception as exc:
        raise InvalidImage(f"the image is truncated or corrupt ({exc})", param="image_url") from None


def check_size(width: int, height: int, limits: ImageLimits) -> None:
    """Refuse empty, over-large or extremely elongated images."""
    if width < 1 or height < 1:
        raise InvalidImage(f"the image is {width}x{height}; it has no pixels", param="image_url")
    if width * height > limits.max_pixels:
        raise InvalidImage(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}",
            param="image_url",
        )
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise InvalidImage(
            f"the image is {width}x{height}, an aspect ratio of {ratio:.0f}:1; the limit is "
            f"{limits.max_aspect_ratio:g}:1",
            param="image_url",
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the Kosmos-2 processor makes it: transparency on white; 16-bit and float scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            values = values / 257.0  # 16-bit range onto 8 bits
        elif values.max(initial=0.0) <= 1.0:
            values = values * 255.0  # float images in [0, 1]
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def resize(image: Image.Image) -> np.ndarray:
    """Squash an RGB image to 224x224 with bicubic filtering, as the processor does (no aspect kept; its crop is
    a no-op): Pillow's bytes, computed about three times as fast by :func:`serve.kosmos2.resample.resize_bicubic`."""
    return resize_bicubic(image, SIZE)


def compile_resize() -> None:
    """Compile the resize's passes now (numba: about 2 s, a fraction of that once its cache on disk holds them),
    so that a replica's first request does not wait for them."""
    resize(Image.new("RGB", (SIZE + 1, SIZE + 1)))

"""The image path end to end: one shape on a plain background, sent through the live service with the ``openai``
SDK to the pixel engine, must come back boxed where it is, whatever the encoding, orientation or shape of the
image, streamed or not, and in a batch of 32 different images at once.

The pixel engine (``serve.engine.pixels``) boxes what differs from the top-left pixel of exactly the pixels the
engine receives, so an image mirrored, turned, squashed the wrong way, composited wrongly or swapped with another
anywhere between the client and the engine gives a box elsewhere (``docs/testing.md`` lists the defects these
tests were seen to catch).
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from openai import AsyncOpenAI, OpenAI
from PIL import Image, ImageOps
from ray import serve

from serve.app.client import image_data_uri
from tests.helpers import encode, iou, shape_image

pytestmark = pytest.mark.slow

RED = (230, 20, 20)
SIZE = (320, 240)
BOX = (40, 20, 200, 90)
"""The shape of most cases: a flat ellipse at the top left of a 320x240 picture, away from its centre lines and
its diagonal, so that any mirror, turn or swap of axes moves it off itself."""


@dataclass(frozen=True)
class Case:
    """An encoded image and where its shape is, as the image is displayed."""

    data: bytes
    box: tuple[int, int, int, int]
    colour: str = "red"


def transparent() -> bytes:
    """Red on a transparent background whose hidden colours are noise: only compositing on white leaves it plain."""
    noise = np.random.default_rng(0).integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    inside = np.asarray(shape_image(*SIZE, BOX, colour=(255, 255, 255), background=(0, 0, 0)))[..., :1] > 0
    pixels = np.where(inside, np.array(RED, dtype=np.uint8), noise)
    return encode(Image.fromarray(np.dstack([pixels, inside * np.uint8(255)]), "RGBA"))


def sixteen_bit() -> bytes:
    inside = np.asarray(shape_image(*SIZE, BOX, colour=(0, 0, 0)))[..., 0] == 0
    image = Image.fromarray(np.where(inside, 20000, 65535).astype(np.uint16))
    assert image.mode == "I;16"
    return encode(image)


UNDO = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
"""For each EXIF orientation, the turn that stores a displayed image so that the orientation displays it again."""


def oriented(orientation: int) -> bytes:
    """A JPEG stored turned or mirrored, with the EXIF orientation that displays the usual picture."""
    displayed = shape_image(*SIZE, BOX, RED)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(displayed.transpose(UNDO[orientation]), "JPEG", quality=95, exif=exif)
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert shown.size == SIZE and np.abs(np.asarray(shown, dtype=int) - np.asarray(displayed, dtype=int)).mean() < 3
    return data


CASES: dict[str, Callable[[], Case]] = {
    "png": lambda: Case(encode(shape_image(*SIZE, BOX, RED)), BOX),
    "jpeg": lambda: Case(encode(shape_image(*SIZE, BOX, RED), "JPEG", quality=90), BOX),
    "rgba": lambda: Case(transparent(), BOX),
    "grayscale": lambda: Case(encode(shape_image(*SIZE, BOX, (90, 90, 90)).convert("L")), BOX, "gray"),
    "palette": lambda: Case(encode(shape_image(*SIZE, BOX, RED).quantize(4)), BOX),
    "gif": lambda: Case(encode(shape_image(*SIZE, BOX, RED).quantize(4), "GIF"), BOX),
    "16-bit": lambda: Case(sixteen_bit(), BOX, "gray"),
    **{f"exif-{o}": (lambda o=o: Case(oriented(o), BOX)) for o in UNDO},
    "wide": lambda: Case(encode(shape_image(2000, 100, (300, 20, 800, 80), RED)), (300, 20, 800, 80)),
    "tall": lambda: Case(encode(shape_image(100, 2000, (20, 300, 80, 800), RED)), (20, 300, 80, 800)),
}


@pytest.fixture(scope="module")
def pixels_app(deploy_app):
    """The service with the pixel engine, remote images allowed from this machine; deleted after the module. The
    engine gathers what arrives within 0.1 s into one step, so that concurrent requests share the engine."""
    url = deploy_app(
        "pixels",
        {
            "engine": {"kind": "pixels", "max_batch_size": 32, "batch_wait_s": 0.1},
            "preprocessor": {"ray_actor_options": {"num_cpus": 0}},
            "http": {"allow_remote_images": True, "allow_private_addresses": True, "remote_image_hosts": ["127.0.0.1"]},
        },
    )
    yield url
    serve.delete("pixels")


@pytest.fixture(scope="module")
def client(pixels_app):
    return OpenAI(base_url=f"{pixels_app}/v1", api_key="unused", max_retries=0)


def ask(client: OpenAI, url: str, stream: bool = False, **extra) -> tuple[str, list[dict], str, dict]:
    """Content, entities, finish reason and usage of one request about the image at ``url``."""
    text = extra.pop("text", None)
    content = [{"type": "image_url", "image_url": {"url": url}}] + ([{"type": "text", "text": text}] if text else [])
    options = {"max_tokens": extra.pop("max_tokens", 48), "extra_body": {"task": "caption", **extra}}
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": content}]
    if not stream:
        response = client.chat.completions.create(model=model, messages=messages, **options)
        choice = response.choices[0]
        return choice.message.content, choice.message.entities, choice.finish_reason, response.usage.model_dump()
    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **options
        )
    )
    final = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, final[0].delta.entities, final[0].finish_reason, chunks[-1].usage.model_dump()


def check_boxed(content: str, entities: list[dict], box: tuple[int, ...], colour: str) -> None:
    assert content == f"An image of a {colour} shape"
    (entity,) = entities
    assert entity["phrase"] == f"a {colour} shape" and len(entity["boxes_px"]) == 1
    assert iou(entity["boxes_px"][0], box) >= 0.5, (entity["boxes_px"], box)


@pytest.mark.parametrize("name", CASES)
def test_the_caption_boxes_the_shape(client, name):
    case = CASES[name]()
    url = image_data_uri(case.data)
    content, entities, finish, _ = ask(client, url)
    check_boxed(content, entities, case.box, case.colour)
    assert finish == "stop"
    assert ask(client, url, stream=True)[:3] == (content, entities, finish)


def test_the_fast_jpeg_path_boxes_the_shape(deploy_app):
    url = deploy_app(
        "pixels-fast-jpeg",
        {
            "engine": {"kind": "pixels"},
            "preprocessor": {"ray_actor_options": {"num_cpus": 0}},
            "limits": {"fast_jpeg": True},
        },
    )
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        box = (200, 150, 650, 600)  # a 1600x1200 JPEG: libjpeg decodes it at an eighth of its size
        image = image_data_uri(encode(shape_image(1600, 1200, box, RED), "JPEG", quality=90))
        for stream in (False, True):
            content, entities, _, _ = ask(client, image, stream=stream)
            check_boxed(content, entities, box, "red")
    finally:
        serve.delete("pixels-fast-jpeg")


@pytest.fixture(scope="module")
def image_server():
    """An HTTP server on 127.0.0.1 serving ``/shape.png``: the usual picture."""
    data = encode(shape_image(*SIZE, BOX, RED))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.parametrize("stream", [False, True])
def test_a_remote_image_is_boxed(client, image_server, stream):
    content, entities, _, _ = ask(client, f"{image_server}/shape.png", stream=stream)
    check_boxed(content, entities, BOX, "red")


def test_every_task_answers_from_the_pixels(client):
    box = (300, 20, 800, 80)
    url = image_data_uri(encode(shape_image(2000, 100, box, RED)))

    def boxed(entities: list[dict], phrase: str) -> None:
        (entity,) = [e for e in entities if e["phrase"] == phrase]
        assert iou(entity["boxes_px"][0], box) >= 0.5

    content, entities, _, _ = ask(client, url, task="ground", text="the red disc")
    assert content == "the red disc"
    boxed(entities, "the red disc")
    content, entities, _, _ = ask(client, url, task="vqa", text="What is there?")
    assert content == "a red shape"
    boxed(entities, "a red shape")
    content, entities, _, _ = ask(client, url, task="detailed_caption")
    assert content == "The image shows a red shape on a white background, at the left."
    boxed(entities, "a red shape")
    assert ask(client, url, task="describe_region", region=[0.15, 0.2, 0.4, 0.8])[0] == "It is a red shape."
    assert ask(client, url, task="describe_region", region=[0.6, 0.2, 0.9, 0.8])[0] == "It is the white background."
    assert ask(client, url, task="raw", text="<grounding> Here:")[0] == "Here: a red shape"


def test_a_plain_image_gets_no_box_and_max_tokens_holds(client):
    plain = image_data_uri(encode(Image.new("RGB", (300, 200), (20, 40, 220))))
    assert ask(client, plain)[:3] == ("An image of nothing but a plain blue background", [], "stop")
    url = image_data_uri(encode(shape_image(*SIZE, BOX, RED)))
    content, entities, finish, usage = ask(client, url, max_tokens=3)
    assert (content, entities, finish, usage["completion_tokens"]) == ("An image of a red", [], "length", 3)
    content, entities, finish, usage = ask(client, url, max_tokens=30, ignore_eos=True)
    check_boxed(content, entities, BOX, "red")
    assert (finish, usage["completion_tokens"]) == ("length", 30)


COLOURS = {"red": RED, "green": (30, 170, 50), "blue": (20, 40, 230), "yellow": (240, 220, 20)}


def test_32_images_at_once_each_boxed_in_its_own_answer(pixels_app):
    boxes = [(10 + 40 * (i % 8), 10 + 50 * (i // 8), 90 + 40 * (i % 8), 90 + 50 * (i // 8)) for i in range(32)]
    names = [list(COLOURS)[i % 4] for i in range(32)]
    images = [
        encode(
            shape_image(400, 300, box, COLOURS[name]), "JPEG" if i % 2 else "PNG", **({"quality": 90} if i % 2 else {})
        )
        for i, (box, name) in enumerate(zip(boxes, names))
    ]

    async def send_all() -> list:
        async with AsyncOpenAI(base_url=f"{pixels_app}/v1", api_key="unused", max_retries=0) as client:
            model = (await client.models.list()).data[0].id
            return await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=model,
                        messages=[
                            {
                                "role": "user",
                                "content": [{"type": "image_url", "image_url": {"url": image_data_uri(data)}}],
                            }
                        ],
                        max_tokens=24,
                        extra_body={"task": "caption"},
                    )
                    for data in images
                )
            )

    responses = asyncio.run(send_all())
    for i, (response, box, name) in enumerate(zip(responses, boxes, names)):
        message = response.choices[0].message
        check_boxed(message.content, message.entities, box, name)
        found = message.entities[0]["boxes_px"][0]
        assert max(range(32), key=lambda j: iou(found, boxes[j])) == i

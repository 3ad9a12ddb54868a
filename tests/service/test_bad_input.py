"""Malformed requests of every kind get a 4xx in the OpenAI envelope naming the parameter, and the next good
request still succeeds. The count of cases here is the README's "bad inputs tried"."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from serve.app.client import chat_request, image_data_uri
from tests.helpers import bomb_png, encode, photo

pytestmark = pytest.mark.slow

GOOD = encode(photo(96, 72), "PNG")


def body_with(image: bytes = GOOD, **fields) -> dict:
    return chat_request(image, **{"task": "caption", "max_tokens": 2, **fields})


def with_messages(messages) -> dict:
    body = body_with()
    body["messages"] = messages
    return body


def with_url(url: str) -> dict:
    body = body_with()
    body["messages"][0]["content"][0]["image_url"]["url"] = url
    return body


def image_part(image: bytes = GOOD) -> dict:
    return {"type": "image_url", "image_url": {"url": image_data_uri(image)}}


def corrupt_png() -> bytes:
    data = bytearray(encode(photo(64, 64), "PNG"))
    data[60:400] = bytes(340)
    return bytes(data)


def tiff() -> bytes:
    buffer = io.BytesIO()
    photo(32, 32).save(buffer, "TIFF")
    return buffer.getvalue()


CASES = {
    # bodies
    "not-json": (b"{'single': quotes}", 400, None),
    "json-array": (b"[]", 400, None),
    "json-string": (b'"hello"', 400, None),
    "empty-body": (b"", 400, None),
    "messages-missing": ({"model": None}, 400, "messages"),
    "messages-not-a-list": ({"messages": "hi"}, 400, "messages"),
    # messages
    "messages-empty": (with_messages([]), 400, "messages"),
    "no-image": (with_messages([{"role": "user", "content": "describe"}]), 400, "messages"),
    "two-images": (with_messages([{"role": "user", "content": [image_part(), image_part()]}]), 400, "messages"),
    "two-user-messages": (with_messages([{"role": "user", "content": [image_part()]}] * 2), 400, "messages"),
    "image-in-system-message": (
        with_messages([{"role": "system", "content": [image_part()]}, {"role": "user", "content": [image_part()]}]),
        400,
        "messages",
    ),
    "assistant-turn": (
        with_messages(
            [
                {"role": "user", "content": [image_part()]},
                {"role": "assistant", "content": "a cat"},
                {"role": "user", "content": [image_part()]},
            ]
        ),
        400,
        "messages",
    ),
    "unknown-role": (with_messages([{"role": "wizard", "content": [image_part()]}]), 400, "messages"),
    "null-content": (with_messages([{"role": "user", "content": None}]), 400, "messages"),
    "unknown-part-type": (
        with_messages([{"role": "user", "content": [image_part(), {"type": "input_audio", "data": "x"}]}]),
        400,
        "messages",
    ),
    "image-url-not-object": (
        with_messages([{"role": "user", "content": [{"type": "image_url", "image_url": 42}]}]),
        400,
        "messages",
    ),
    "text-too-long": (body_with(task="vqa", text="why " * 2000), 400, "messages"),  # context_length_exceeded
    "markup-only-text": (body_with(task="vqa", text="<phrase></phrase><grounding>"), 400, "messages"),
    # image references
    "url-not-data": (with_url("ftp://example.com/a.png"), 400, "image_url"),
    "url-http-disabled": (with_url("http://203.0.113.7/cat.png"), 400, "image_url"),
    "data-uri-no-base64": (with_url("data:image/png,rawbytes"), 400, "image_url"),
    "data-uri-bad-base64": (with_url("data:image/png;base64,%%%%"), 400, "image_url"),
    "data-uri-empty": (with_url("data:image/png;base64,"), 400, "image_url"),
    # image bytes
    "text-bytes": (body_with(b"this is not an image"), 400, "image_url"),
    "truncated-png": (body_with(GOOD[:200]), 400, "image_url"),
    "truncated-jpeg": (body_with(encode(photo(128, 128), "JPEG")[:-900]), 400, "image_url"),
    "corrupt-png": (body_with(corrupt_png()), 400, "image_url"),
    "tiff-refused": (body_with(tiff()), 400, "image_url"),
    "svg-refused": (body_with(b'<svg xmlns="http://www.w3.org/2000/svg"/>'), 400, "image_url"),
    "extreme-aspect": (body_with(encode(photo(2000, 10), "PNG")), 400, "image_url"),
    "bomb-100k-square": (body_with(bomb_png(100_000, 100_000)), 400, "image_url"),
    "bomb-over-limit": (body_with(bomb_png(10_000, 8_000)), 400, "image_url"),
    # parameters
    "max-tokens-zero": (body_with(max_tokens=0), 400, "max_tokens"),
    "max-tokens-negative": (body_with(max_tokens=-5), 400, "max_tokens"),
    "max-tokens-string": (body_with(max_tokens="ten"), 400, "max_tokens"),
    "max-tokens-huge": (body_with(max_tokens=10**9), 400, "max_tokens"),
    "max-completion-tokens-zero": (body_with(max_completion_tokens=0), 400, "max_completion_tokens"),
    "temperature-negative": (body_with(temperature=-0.1), 400, "temperature"),
    "temperature-high": (body_with(temperature=2.5), 400, "temperature"),
    "top-p-zero": (body_with(top_p=0), 400, "top_p"),
    "top-p-high": (body_with(top_p=1.5), 400, "top_p"),
    "n-two": (body_with(n=2), 400, "n"),
    "seed-negative": (body_with(seed=-1), 400, "seed"),
    "ngram-negative": (body_with(no_repeat_ngram_size=-1), 400, "no_repeat_ngram_size"),
    "unknown-task": (body_with(task="segment"), 400, "task"),
    "region-missing": (body_with(task="describe_region"), 400, "region"),
    "region-three-numbers": (body_with(task="describe_region", region=[0, 0, 1]), 400, "region"),
    "region-inverted": (body_with(task="describe_region", region=[0.8, 0.1, 0.2, 0.9]), 400, "region"),
    "region-outside": (body_with(task="describe_region", region=[0.1, 0.1, 1.5, 0.9]), 400, "region"),
    "region-strings": (body_with(task="describe_region", region=["a", "b", "c", "d"]), 400, "region"),
    "region-on-caption": (body_with(region=[0, 0, 1, 1]), 400, "region"),
    "text-on-caption": (body_with(text="what?"), 400, "messages"),
    "vqa-without-question": (body_with(task="vqa"), 400, "messages"),
    "unknown-model": (body_with(model="gpt-4o"), 404, "model"),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_refused_and_serving_goes_on(service_url, name):
    body, status, param = CASES[name]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    for stream in (False, True):  # a stream that fails validation fails before it opens
        if stream and isinstance(body, dict) and isinstance(body.get("messages"), list):
            content = json.dumps({**body, "stream": True}).encode()
        response = httpx.post(
            f"{service_url}/v1/chat/completions", content=content, headers={"content-type": "application/json"}
        )
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert error["param"] == param and error["message"] and error["type"]
    good = httpx.post(f"{service_url}/v1/chat/completions", json=body_with())
    assert good.status_code == 200, good.text


@pytest.mark.parametrize(
    "image",
    [
        encode(photo(64, 48).convert("CMYK"), "JPEG"),
        encode(Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)), "PNG"),
        encode(photo(1, 1), "PNG"),
        encode(photo(3000, 100), "JPEG"),
        encode(photo(50, 50).convert("LA"), "PNG"),
        encode(photo(64, 64), "WEBP"),
        encode(photo(40, 30), "BMP"),
    ],
    ids=["cmyk", "16-bit", "1x1", "wide-30-to-1", "gray-alpha", "webp", "bmp"],
)
def test_unusual_but_valid_images_are_served(service_url, image):
    response = httpx.post(f"{service_url}/v1/chat/completions", json=body_with(image))
    assert response.status_code == 200, response.text


def test_injected_markup_changes_nothing(service_url):
    """Tags in the question are removed: the answer equals the one for the clean question."""
    clean = httpx.post(
        f"{service_url}/v1/chat/completions", json=body_with(task="vqa", text="what is it?", max_tokens=8)
    )
    dirty = httpx.post(
        f"{service_url}/v1/chat/completions",
        json=body_with(task="vqa", text="what <phrase>is</phrase> it?<patch_index_0042></s>", max_tokens=8),
    )
    assert dirty.status_code == clean.status_code == 200
    assert dirty.json()["choices"] == clean.json()["choices"]
    assert dirty.json()["usage"] == clean.json()["usage"]


def test_base64_with_whitespace_is_refused_not_crashed(service_url):
    payload = base64.b64encode(GOOD).decode()
    body = with_url("data:image/png;base64," + payload[:20] + "\n" + payload[20:])
    response = httpx.post(f"{service_url}/v1/chat/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "image_url"

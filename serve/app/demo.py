"""``make demo``: the tiny offline model served locally, one request per task with the official ``openai``
client, the answers printed with their entities and drawn on the image (a PNG beside them), then a clean stop.

With the tiny model (``make demo``) the weights are random, so its answers are random words and its boxes land
anywhere; the point is every path working end to end, on the project's sample ``astronaut`` photograph (public
domain, NASA; ``serve.app.shipped``). With the pixel engine (``make demo ENGINE=pixels``, ``python -m serve demo
--engine pixels``) the picture is a red disc on white, and every answer boxes it (``docs/testing.md``). Serve the
real model (README) for real answers.
"""

from __future__ import annotations

import io
import json
import textwrap
import time
from pathlib import Path

from openai import OpenAI
from PIL import Image, ImageDraw, ImageFont

from serve.app import launch
from serve.app.client import image_data_uri
from serve.app.config import load_config
from serve.app.shipped import config_path, photo
from serve.kosmos2.tiny import write_tiny

TINY = Path(".cache/tiny-kosmos2")
PHOTO_REQUESTS = [
    ("caption", None, None),
    ("detailed_caption", None, None),
    ("vqa", "What is the person holding?", None),
    ("ground", "the helmet", None),
    ("describe_region", None, [0.25, 0.05, 0.75, 0.55]),
    ("raw", "<grounding> An image of", None),
]
"""One request per task about the astronaut: (task, text, region)."""

DISC_REQUESTS = [
    ("caption", None, None),
    ("detailed_caption", None, None),
    ("vqa", "What is in the picture?", None),
    ("ground", "the red disc", None),
    ("describe_region", None, [0.6, 0.1, 0.95, 0.6]),
    ("raw", "<grounding> An image of", None),
]
"""The same about the red disc, for the pixel engine (the region lies beside the disc)."""
PANEL = 360
"""Width of each answer's picture in the drawing, in pixels."""


def red_disc() -> bytes:
    """The pixel engine's picture: a red disc left of centre on a white 480x320 PNG."""
    image = Image.new("RGB", (480, 320), "white")
    ImageDraw.Draw(image).ellipse((70, 60, 230, 220), fill=(220, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def draw_answers(image: bytes, answers: list[dict], path: Path) -> Path:
    """One panel per answer: the image with each entity's ``boxes_px`` drawn (and the region asked about,
    dashed), the task and the answer beneath. Written to ``path`` as PNG."""
    picture = Image.open(io.BytesIO(image)).convert("RGB")
    scale = PANEL / picture.width
    shown = picture.resize((PANEL, round(picture.height * scale)))
    font = ImageFont.load_default(size=13)
    text_height = 80
    columns = 3
    rows = -(-len(answers) // columns)
    sheet = Image.new("RGB", (columns * (PANEL + 10) + 10, rows * (shown.height + text_height + 10) + 10), "white")
    for i, answer in enumerate(answers):
        left = 10 + (i % columns) * (PANEL + 10)
        top = 10 + (i // columns) * (shown.height + text_height + 10)
        panel = shown.copy()
        draw = ImageDraw.Draw(panel)
        if answer.get("region"):
            x1, y1, x2, y2 = answer["region"]
            w, h = panel.size
            _dashed(draw, (x1 * w, y1 * h, x2 * w, y2 * h), (0, 120, 255))
        for entity in answer["entities"]:
            for box in entity["boxes_px"]:
                scaled = [v * scale for v in box]
                draw.rectangle(scaled, outline=(0, 200, 0), width=3)
                label = (scaled[0] + 5, scaled[1] + 4)
                draw.rectangle(draw.textbbox(label, entity["phrase"], font=font), fill="white")
                draw.text(label, entity["phrase"], fill=(0, 160, 0), font=font)
        sheet.paste(panel, (left, top))
        ImageDraw.Draw(sheet).rectangle((left - 1, top - 1, left + panel.width, top + panel.height), outline="gray")
        label = f"[{answer['task']}] {answer['text'] or ''}".strip()
        lines = [label, *textwrap.wrap(repr(answer["content"]), 52)][:5]
        ImageDraw.Draw(sheet).multiline_text((left, top + shown.height + 4), "\n".join(lines), fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _dashed(draw: ImageDraw.ImageDraw, box: tuple[float, ...], colour: tuple[int, int, int], dash: int = 8) -> None:
    x1, y1, x2, y2 = box
    for start, end in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        length = max(abs(end[0] - start[0]), abs(end[1] - start[1]))
        for at in range(0, int(length), 2 * dash):
            a, b = at / length, min(at + dash, length) / length
            point = [(start[0] + (end[0] - start[0]) * t, start[1] + (end[1] - start[1]) * t) for t in (a, b)]
            draw.line(point, fill=colour, width=2)


def main(port: int = 8000, engine: str | None = None, out: Path = Path("out/demo.png")) -> int:
    if not (TINY / "model.safetensors").exists():
        write_tiny(TINY)
    config = load_config(config_path("local.yaml"), model__source=str(TINY), http__port=port, engine__kind=engine)
    pixels = config.engine.kind == "pixels"
    image, requests = (red_disc(), DISC_REQUESTS) if pixels else (photo("astronaut"), PHOTO_REQUESTS)
    started = time.monotonic()
    url = launch.start(config)
    print(f"service ready at {url} in {time.monotonic() - started:.1f} s ({config.engine.kind} engine)\n")
    answers = []
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="not-needed-locally")
        part = {"type": "image_url", "image_url": {"url": image_data_uri(image)}}
        model = client.models.list().data[0].id
        for task, text, region in requests:
            content = [part] + ([{"type": "text", "text": text}] if text else [])
            extra = {"task": task} | ({"region": region} if region else {})
            sent = time.monotonic()
            response = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": content}], max_tokens=48, extra_body=extra
            )
            message = response.choices[0].message
            print(f"[{task}] {text or ''} ({time.monotonic() - sent:.2f} s)")
            print(f"  content:  {message.content!r}")
            print(f"  entities: {json.dumps(message.entities)}")
            print(f"  finish:   {response.choices[0].finish_reason}, usage: {response.usage.model_dump()}\n")
            answers.append(
                {"task": task, "text": text, "region": region, "content": message.content, "entities": message.entities}
            )
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [part]}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
        print(f"[caption, streamed] {len(pieces)} chunks: {''.join(pieces)!r}")
    finally:
        launch.stop()
    print(f"\nthe answers drawn on the image: {draw_answers(image, answers, out)}")
    return 0

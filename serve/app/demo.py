"""``make demo``: the tiny offline model served locally, one request per task with the official ``openai``
client, the answers printed with their entities, then a clean stop.

The tiny model's weights are random, so its answers are random words; the point is every path working end
to end. Serve the real model (README) for real answers. The picture is the project's sample ``astronaut``
(public domain, NASA; ``serve.app.shipped``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from openai import OpenAI

from serve.app import launch
from serve.app.client import image_data_uri
from serve.app.config import load_config
from serve.app.shipped import config_path, photo
from serve.kosmos2.tiny import write_tiny

TINY = Path(".cache/tiny-kosmos2")
REQUESTS = [
    ("caption", None, None),
    ("detailed_caption", None, None),
    ("vqa", "What is the person holding?", None),
    ("ground", "the helmet", None),
    ("describe_region", None, [0.25, 0.05, 0.75, 0.55]),
    ("raw", "<grounding> An image of", None),
]


def main(port: int = 8000) -> int:
    if not (TINY / "model.safetensors").exists():
        write_tiny(TINY)
    config = load_config(config_path("local.yaml"), model__source=str(TINY), http__port=port)
    started = time.monotonic()
    url = launch.start(config)
    print(f"service ready at {url} in {time.monotonic() - started:.1f} s\n")
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="not-needed-locally")
        image = {"type": "image_url", "image_url": {"url": image_data_uri(photo("astronaut"))}}
        model = client.models.list().data[0].id
        for task, text, region in REQUESTS:
            content = [image] + ([{"type": "text", "text": text}] if text else [])
            extra = {"task": task} | ({"region": region} if region else {})
            sent = time.monotonic()
            response = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": content}], max_tokens=24, extra_body=extra
            )
            message = response.choices[0].message
            print(f"[{task}] {text or ''} ({time.monotonic() - sent:.2f} s)")
            print(f"  content:  {message.content!r}")
            print(f"  entities: {json.dumps(message.entities)}")
            print(f"  finish:   {response.choices[0].finish_reason}, usage: {response.usage.model_dump()}\n")
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": [image]}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
        print(f"[caption, streamed] {len(pieces)} chunks: {''.join(pieces)!r}")
    finally:
        launch.stop()
    return 0

"""The CPU operators of a batch: each input to a prepared engine request, and each generated answer to its output row.

Preparing a batch line is the service's path for the same body: ``parse_request`` and ``job_from_request`` check
it (every field honoured or refused by name), ``Pipeline.prompt`` checks the task's text, ``image_bytes`` reads
the image (a data URI, or an http(s) URL where the config allows), ``Pipeline.prepare`` decodes and resizes it.
An image of a folder or table becomes the chat request a client would send for it, with the job's task and
options (or the row's own), read where it lies (:func:`~serve.batch.sources.read_image`). Finishing decodes the
tokens (``Pipeline.decoding``, as the Preprocessor does), builds the answer with ``finished_of`` and writes it as
the service writes it: ``completion`` for a batch line, the answer's columns for an image. Any error becomes the
item's ``failure`` and its row says why; none stops the batch.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import pyarrow as pa

from serve.app.config import ServiceConfig
from serve.app.messages import job_from_request
from serve.app.preprocessor import finished_of, image_bytes
from serve.app.protocol import completion_id
from serve.app.responses import completion, entities_out, parse_request
from serve.batch.batch_file import LineError, answered, custom_id_in, parse_line, refused
from serve.batch.items import Item, from_block, to_block
from serve.batch.sources import read_image
from serve.engine.model import load_processor
from serve.errors import InvalidRequest, ServiceError, error_response
from serve.kosmos2.decoding import Outcome
from serve.kosmos2.images import ImageLimits, compile_resize
from serve.kosmos2.pipeline import Pipeline

log = logging.getLogger("ray.data")

LINE_SLACK_BYTES = 65536
"""What a batch line may hold beyond its body (``custom_id``, ``method``, ``url``)."""

STATS = {
    "_ok": pa.bool_(),
    "_prompt_tokens": pa.int64(),
    "_completion_tokens": pa.int64(),
    "_sent": pa.float64(),
    "_done": pa.float64(),
}
"""Columns every output block carries for the run's summary (the writer keeps them out of the files): whether the
row is an answer, its token counts, and when the engine took it and answered it."""

LINES_OUT = pa.schema([("key", pa.int64()), ("line", pa.string()), *STATS.items()])
"""A finished block of a batch file: each line's offset in the input and its output line."""

ENTITY = pa.struct(
    [
        ("phrase", pa.string()),
        ("span", pa.list_(pa.int64())),
        ("boxes", pa.list_(pa.list_(pa.float64()))),
        ("boxes_px", pa.list_(pa.list_(pa.float64()))),
    ]
)
IMAGES_OUT = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.string()),
        ("task", pa.string()),
        ("text", pa.string()),
        ("entities", pa.list_(ENTITY)),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("error", pa.string()),
        ("error_code", pa.string()),
        *STATS.items(),
    ]
)
"""A finished block of images: one row per image, the answer's text and entities, or the error that stopped it."""


@functools.cache
def _pipeline(source: str, limits: ImageLimits, max_seq_len: int) -> Pipeline:
    compile_resize()
    return Pipeline(load_processor(source), limits, max_seq_len)


def pipeline_for(config: ServiceConfig) -> Pipeline:
    """The config's pipeline, made once per worker process (its tokenizer and the compiled resize)."""
    return _pipeline(config.model.source, config.limits.image_limits(), config.engine.max_seq_len)


def prepare_lines(block: pa.Table, config: ServiceConfig) -> pa.Table:
    """Lines of a batch file (``sources.LINES``) to items, prepared or failed."""
    return to_block(asyncio.run(_gather(_prepare_line, block.to_pylist(), config)), pa.int64())


def prepare_images(block: pa.Table, config: ServiceConfig, options: dict[str, Any]) -> pa.Table:
    """Images (``sources.image_table`` rows) to items, prepared or failed; ``options``: the request fields every
    image gets (task, text, max_tokens ...), under a row's own task, text and region."""
    rows = block.to_pylist()
    return to_block(asyncio.run(_gather(_prepare_image, rows, config, options)), pa.string())


async def _gather(prepare, rows: list[dict[str, Any]], *args: Any) -> list[Item]:
    return list(await asyncio.gather(*(prepare(row, *args) for row in rows)))


async def _prepare_line(row: dict[str, Any], config: ServiceConfig) -> Item:
    item = Item(row["key"], {"custom_id": None}, completion_id())
    try:
        if row["line"] is None:
            limit = config.limits.max_body_bytes
            raise LineError("line_too_large", f"the line is {row['size']} bytes; its body may be at most {limit}")
        item.source["custom_id"], body = parse_line(row["line"])
        request = parse_request(body)
        if request.stream:
            raise InvalidRequest("stream: a batch answers each request whole; leave stream out", param="stream")
        job = job_from_request(request, config, item.request_id)
        await _prepare(item, job, config, lambda url: image_bytes(url, config))
    except (LineError, ServiceError) as exc:
        item.failure = exc
    except Exception:
        item.failure = _internal(item)
    if item.failure is not None and item.source["custom_id"] is None:
        item.source["custom_id"] = custom_id_in(row["line"])
    return item


async def _prepare_image(row: dict[str, Any], config: ServiceConfig, options: dict[str, Any]) -> Item:
    item = Item(row["key"], {"image": row["image"], "task": row["task"] or options.get("task")}, completion_id())
    try:
        if row["image"] is None:
            raise InvalidRequest("the row has no image", param="image")
        job = job_from_request(parse_request(image_request(row, options)), config, item.request_id)
        item.source["task"] = job.query.task.value
        await _prepare(item, job, config, lambda location: _image_at(location, config))
    except ServiceError as exc:
        item.failure = exc
    except Exception:
        item.failure = _internal(item)
    return item


def image_request(row: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The chat request a client would send for one image: the job's options, under the row's own.

    >>> request = image_request({"image": "a.jpg", "task": None, "text": "the dog"}, {"task": "ground"})
    >>> request["task"], request["messages"][0]["content"]
    ('ground', [{'type': 'image_url', 'image_url': {'url': 'a.jpg'}}, {'type': 'text', 'text': 'the dog'}])
    """
    fields = {k: v for k, v in options.items() if k != "text"}
    fields.update({k: row[k] for k in ("task", "region") if row.get(k) is not None})
    text = row.get("text") or options.get("text")
    content = [{"type": "image_url", "image_url": {"url": row["image"]}}]
    content += [{"type": "text", "text": text}] if text else []
    return {**fields, "messages": [{"role": "user", "content": content}]}


async def _image_at(location: str, config: ServiceConfig) -> bytes:
    if location.startswith(("data:", "http://", "https://")):
        return await image_bytes(location, config)
    return read_image(location, config.limits.max_image_bytes)


async def _prepare(item: Item, job, config: ServiceConfig, fetch) -> None:
    """The Preprocessor's steps: the prompt (bad text fails before any image is read), the image, its pixels."""
    pipeline = pipeline_for(config)
    pipeline.prompt(job.query)
    item.prepared = pipeline.prepare(job.query, await fetch(job.image_url))


def _internal(item: Item) -> ServiceError:
    log.exception("unexpected error preparing %r", item.key)
    return ServiceError("internal error while preparing the request; it has been logged", code="internal_error")


def outcome_of(item: Item, pipeline: Pipeline) -> Outcome:
    """The answer to an item the engine generated (decoded here, or as its tokens came where it had stop strings)."""
    if isinstance(item.generated, Outcome):
        return item.generated
    return pipeline.decoding(item.prepared).finish(item.generated)


def finish_lines(block: pa.Table, config: ServiceConfig) -> pa.Table:
    """Items of a batch file to their output lines (``LINES_OUT``)."""
    rows = []
    for item in from_block(block):
        custom_id = item.source["custom_id"]
        stats = {"_ok": item.failure is None, "_sent": item.submitted_at, "_done": item.generated_at}
        if isinstance(item.failure, LineError):
            line = refused(custom_id, item.failure)
        elif item.failure is not None:
            status, body, _ = error_response(item.failure)
            line = answered(custom_id, status, item.request_id, body)
        else:
            finished = finished_of(outcome_of(item, pipeline_for(config)), item.prepared)
            body = completion(finished, item.request_id, config.served_model_name).model_dump()
            line = answered(custom_id, 200, item.request_id, body)
            stats.update(_prompt_tokens=finished.prompt_tokens, _completion_tokens=finished.completion_tokens)
        rows.append({"key": item.key, "line": line, **stats})
    return pa.Table.from_pylist(rows, schema=LINES_OUT)


def finish_images(block: pa.Table, config: ServiceConfig) -> pa.Table:
    """Items of images to their output rows (``IMAGES_OUT``)."""
    rows = []
    for item in from_block(block):
        row: dict[str, Any] = {"id": item.key, **item.source, "_ok": item.failure is None}
        row.update(_sent=item.submitted_at, _done=item.generated_at)
        if item.failure is not None:
            _, body, _ = error_response(item.failure)
            row.update(error=body["error"]["message"], error_code=body["error"]["code"] or body["error"]["type"])
        else:
            finished = finished_of(outcome_of(item, pipeline_for(config)), item.prepared)
            row.update(
                text=finished.answer.text,
                entities=[entity.model_dump() for entity in entities_out(finished)],
                finish_reason=finished.finish_reason,
                prompt_tokens=finished.prompt_tokens,
                completion_tokens=finished.completion_tokens,
                _prompt_tokens=finished.prompt_tokens,
                _completion_tokens=finished.completion_tokens,
            )
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=IMAGES_OUT)

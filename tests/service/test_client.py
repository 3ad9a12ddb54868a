"""The client over raw HTTP/1.1 servers: answers, error envelopes, streams, and failures without an answer."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable

import pytest

from serve.app.client import APIError, KosmosClient

PNG = b"\x89PNG\r\n\x1a\n"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict]:
    """The request line and its JSON body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    return lines[0], json.loads(await reader.readexactly(length))


def answer(status: str, body: bytes, headers: str = "content-type: application/json\r\n") -> bytes:
    return f"HTTP/1.1 {status}\r\n{headers}content-length: {len(body)}\r\n\r\n".encode() + body


async def served(handler: Handler, call: Callable[[KosmosClient], Awaitable], timeout: float = 5.0):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with KosmosClient(f"http://127.0.0.1:{port}/", timeout=timeout) as client:
            return await call(client)
    finally:
        server.close()


def test_completion_and_request_body():
    seen = []

    async def handler(reader, writer):
        line, body = await read_request(reader)
        seen.append((line, body))
        completion = {
            "choices": [{"message": {"content": "a dog", "entities": [{"name": "a dog"}]}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 70, "completion_tokens": 3, "total_tokens": 73},
        }
        writer.write(answer("200 OK", json.dumps(completion).encode()))
        await writer.drain()

    completion = asyncio.run(served(handler, lambda c: c.complete(PNG, task="ground", text="a dog", max_tokens=8)))
    assert (completion.content, completion.finish_reason, completion.usage["completion_tokens"]) == ("a dog", "stop", 3)
    assert completion.entities == [{"name": "a dog"}]
    line, body = seen[0]
    assert line == b"POST /v1/chat/completions HTTP/1.1"
    assert (body["task"], body["max_tokens"], body["stream"]) == ("ground", 8, False)
    assert body["messages"][0]["content"][0]["image_url"]["url"] == "data:image/png;base64,iVBORw0KGgo="


def test_error_envelope_with_retry_after():
    async def handler(reader, writer):
        await read_request(reader)
        error = {"error": {"message": "queue full", "type": "overloaded", "param": None, "code": "queue_full"}}
        headers = "content-type: application/json\r\nretry-after: 2\r\n"
        writer.write(answer("429 Too Many Requests", json.dumps(error).encode(), headers))
        await writer.drain()

    with pytest.raises(APIError) as raised:
        asyncio.run(served(handler, lambda c: c.complete(PNG)))
    error = raised.value
    assert (error.status, error.type, error.code, error.message, error.retry_after) == (
        429,
        "overloaded",
        "queue_full",
        "queue full",
        2.0,
    )


def test_stream_chunks_then_done():
    chunks = [{"choices": [{"delta": {"content": w}}]} for w in ("a", " dog")] + [{"choices": [], "usage": {"a": 1}}]

    async def handler(reader, writer):
        await read_request(reader)
        events = "".join(f"data: {json.dumps(c)}\r\n\r\n" for c in chunks) + "data: [DONE]\n\n"
        writer.write(answer("200 OK", events.encode(), "content-type: text/event-stream\r\n"))
        await writer.drain()

    async def collect(client):
        return [chunk async for chunk in client.stream(PNG)]

    assert asyncio.run(served(handler, collect)) == chunks


def test_no_answer_within_the_timeout_is_a_timeout():
    async def handler(reader, writer):
        await read_request(reader)
        await asyncio.sleep(2)

    with pytest.raises(APIError) as raised:
        asyncio.run(served(handler, lambda c: c.complete(PNG), timeout=0.2))
    assert (raised.value.status, raised.value.type) == (0, "timeout")


def test_refused_connection_and_cut_stream_are_transport_errors():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def refused():
        async with KosmosClient(f"http://127.0.0.1:{port}") as client:
            await client.complete(PNG)

    with pytest.raises(APIError) as raised:
        asyncio.run(refused())
    assert (raised.value.status, raised.value.type) == (0, "transport")

    async def cut(reader, writer):
        await read_request(reader)
        writer.write(answer("200 OK", b'data: {"choices": []}\n\n', "content-type: text/event-stream\r\n"))
        await writer.drain()

    async def collect(client):
        return [chunk async for chunk in client.stream(PNG)]

    with pytest.raises(APIError, match="without \\[DONE\\]"):
        asyncio.run(served(cut, collect))


def test_models_lists_the_served_ids():
    async def handler(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"GET /v1/models HTTP/1.1")
        body = json.dumps({"object": "list", "data": [{"id": "kosmos-2", "object": "model"}]}).encode()
        writer.write(answer("200 OK", body))
        await writer.drain()

    assert asyncio.run(served(handler, lambda c: c.models())) == ["kosmos-2"]

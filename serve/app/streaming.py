"""A streamed completion as server-sent events, in OpenAI's chunk shape.

The first chunk holds the role (``delta: {"role": "assistant", "content": ""}``). Each text piece the
Preprocessor sends becomes a chunk at once: text goes out as soon as it is certain, held back only while a tag
or a stop string could still change it; with ``logprobs``, a chunk carries the entries of the tokens whose
text it completes. The final chunk has empty content, the answer's entities (``delta.entities``) and the
finish reason; with ``stream_options.include_usage`` one more chunk holds the usage and no choices. ``[DONE]``
ends every stream. An error after the stream opened becomes an error event (the OpenAI envelope) before it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from serve.app.messages import Finished, TextPiece
from serve.app.protocol import ChatCompletionChunk, ChunkChoice, Delta, Usage, sse
from serve.app.responses import entities_out, logprobs_of, usage_of
from serve.errors import error_response


async def sse_chunks(
    events: Any,
    *,
    request_id: str,
    model: str,
    include_usage: bool,
    deadline: float,
    translate: Callable[[BaseException], BaseException],
    close: Callable[[int, Finished | None], None],
) -> AsyncIterator[str]:
    """The events of ``Preprocessor.stream`` (after ``Started``) as chunks, until ``deadline`` (monotonic).

    ``close`` hears the status once the stream ends (499 when the client went away, which also cancels the
    generation) and the finished answer, if any."""
    created = int(time.time())

    def chunk(delta: Delta, finish: str | None = None, tokens=None, usage: Usage | None = None) -> str:
        choices = [] if usage else [ChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs_of(tokens))]
        return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage))

    status, finished, done = 200, None, False
    try:
        yield chunk(Delta(role="assistant", content=""))
        iterator = events.__aiter__()
        while True:
            event = await asyncio.wait_for(iterator.__anext__(), max(deadline - time.monotonic(), 0.001))
            if isinstance(event, TextPiece):
                yield chunk(Delta(content=event.text), tokens=event.tokens or None)
                continue
            assert isinstance(event, Finished)
            finished, done = event, True
            yield chunk(Delta(content="", entities=entities_out(event)), event.finish_reason)
            if include_usage:
                yield chunk(Delta(), usage=usage_of(event))
            break
    except Exception as exc:  # the stream is open: the error becomes an event
        status, body, _ = error_response(translate(exc))
        done = True
        yield sse(body)
    finally:
        if not done:  # the client went away: stop the generation too
            events.cancel()
            status = 499
        close(status, finished)
    yield sse("[DONE]")

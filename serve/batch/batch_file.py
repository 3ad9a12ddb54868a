"""OpenAI's batch file format, as OpenAI's Batch API and vLLM's ``run-batch`` read and write it.

An input line is a JSON object ``{"custom_id": str, "method": "POST", "url": "/v1/chat/completions", "body": {...}}``
whose body is a chat completion request, the same as the online API takes. Each line gets one output line
``{"id", "custom_id", "response", "error"}``:

- a line that is a request gets ``response: {"status_code", "request_id", "body"}`` and ``error: null``: the body
  is the completion (200), or the OpenAI error envelope with the status the online API answers that body with
  (400 for a bad field, 404 for another model ...), as OpenAI writes a failed request;
- a line that is no request (not JSON, no ``custom_id``, another method or URL, longer than the body limit) gets
  ``response: null`` and ``error: {"code", "message"}`` naming why; its ``custom_id`` is the one found in it, else null.

    >>> parse_line(b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}')
    ('a', {})
    >>> parse_line(b'{"custom_id": "a", "method": "GET"')
    Traceback (most recent call last):
    ...
    serve.batch.batch_file.LineError: the line is not valid JSON (Expecting ',' delimiter: line 1 column 35 (char 34))
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from pydantic import BaseModel

URL = "/v1/chat/completions"
"""The one endpoint a batch line may name."""

_CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*"((?:[^"\\]|\\.){0,512})"')


class LineError(Exception):
    """A line that is no request; ``code`` names the cause."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (LineError, (self.code, self.message))


def parse_line(line: bytes) -> tuple[str, Any]:
    """The ``custom_id`` and ``body`` of an input line; raises :class:`LineError` naming what is wrong."""
    try:
        data = json.loads(line.decode())
    except UnicodeDecodeError:
        raise LineError("invalid_json", "the line is not UTF-8 text") from None
    except ValueError as exc:
        raise LineError("invalid_json", f"the line is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LineError("invalid_json", "a line must be a JSON object")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str):
        raise LineError("missing_custom_id", "the line needs a custom_id string")
    if data.get("method") != "POST":
        raise LineError("invalid_method", f"method must be POST, got {data.get('method')!r}")
    if data.get("url") != URL:
        raise LineError("invalid_url", f"url must be {URL}, the only endpoint batches run; got {data.get('url')!r}")
    if "body" not in data:
        raise LineError("missing_body", "the line needs a body: the chat completion request")
    return custom_id, data["body"]


def custom_id_in(line: bytes | None) -> str | None:
    """The ``custom_id`` a line that does not parse seems to hold, so that its error line names it (else None).

    >>> custom_id_in(b'{"custom_id": "req-7", "body": {"messages": [}')
    'req-7'
    """
    found = _CUSTOM_ID.search(line or b"")
    if found is None:
        return None
    try:
        return json.loads(b'"' + found.group(1) + b'"')
    except ValueError:
        return None


class Response(BaseModel):
    status_code: int
    request_id: str
    body: dict[str, Any]


class Error(BaseModel):
    code: str
    message: str


class OutputLine(BaseModel):
    """One line of the output file."""

    id: str
    custom_id: str | None
    response: Response | None = None
    error: Error | None = None


def answered(custom_id: str | None, status: int, request_id: str, body: dict[str, Any]) -> str:
    """The output line of a request the API answered (its completion, or its error envelope)."""
    response = Response(status_code=status, request_id=request_id, body=body)
    return OutputLine(id=_line_id(), custom_id=custom_id, response=response).model_dump_json()


def refused(custom_id: str | None, error: LineError) -> str:
    """The output line of a line that is no request."""
    line = OutputLine(id=_line_id(), custom_id=custom_id, error=Error(code=error.code, message=error.message))
    return line.model_dump_json()


def _line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"

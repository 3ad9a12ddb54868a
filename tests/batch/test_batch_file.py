"""OpenAI's batch file format: what makes a line no request, and the output lines' fields as OpenAI and vLLM
write them."""

from __future__ import annotations

import json

import pytest

from serve.batch.batch_file import LineError, answered, custom_id_in, parse_line, refused


def line(**fields) -> bytes:
    return json.dumps(
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}, **fields}
    ).encode()


@pytest.mark.parametrize(
    ("text", "code", "message"),
    [
        (b"{", "invalid_json", "not valid JSON"),
        (b"\xff\xfe", "invalid_json", "not UTF-8"),
        (b"[1, 2]", "invalid_json", "a JSON object"),
        (line(custom_id=7), "missing_custom_id", "needs a custom_id string"),
        (line(method="GET"), "invalid_method", "method must be POST, got 'GET'"),
        (line(url="/v1/embeddings"), "invalid_url", "got '/v1/embeddings'"),
        (
            json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions"}).encode(),
            "missing_body",
            "needs a body",
        ),
    ],
)
def test_lines_that_are_no_request_say_why(text, code, message):
    with pytest.raises(LineError, match=message) as raised:
        parse_line(text)
    assert raised.value.code == code


def test_a_request_line_gives_its_custom_id_and_body():
    assert parse_line(line(custom_id="x-1", body={"task": "caption"}, extra=1)) == ("x-1", {"task": "caption"})
    assert custom_id_in(b'{"custom_id": "q\\"7", "body": {') == 'q"7'
    assert custom_id_in(b"no id here") is None


def test_output_lines_have_openais_fields():
    ok = json.loads(answered("a", 200, "chatcmpl-1", {"object": "chat.completion"}))
    assert ok["id"].startswith("batch_req_") and ok["custom_id"] == "a" and ok["error"] is None
    assert ok["response"] == {"status_code": 200, "request_id": "chatcmpl-1", "body": {"object": "chat.completion"}}
    bad = json.loads(refused(None, LineError("invalid_json", "the line is not valid JSON")))
    assert bad["response"] is None and bad["custom_id"] is None
    assert bad["error"] == {"code": "invalid_json", "message": "the line is not valid JSON"}

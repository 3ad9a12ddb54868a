"""The api predictor against a stub of our service on 127.0.0.1 whose answers, and so whose score, are known:
retries after 503 with Retry-After, resumes from a partial predictions.jsonl, and sends the key."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from eval.__main__ import main
from eval.datasets import RefExample, load_mdetr
from eval.synth import write_synthetic

N = 24
BEHAVIOURS = ("correct", "wrong", "silent", "other-phrase", "second-box", "busy-once")
"""What the stub answers for expression i: BEHAVIOURS[i % 6]."""


class Stub:
    """Answers chat completions in our response shape with boxes chosen per (image, expression)."""

    def __init__(self, examples: list[RefExample], api_key: str | None = None) -> None:
        self.plan = {self.key(e.read_image(), e.expression): (i, e) for i, e in enumerate(examples)}
        self.api_key = api_key
        self.calls: Counter[int] = Counter()
        self.bodies: list[dict] = []
        self.always_busy: set[int] = set()
        self.lock = threading.Lock()

    @staticmethod
    def key(image: bytes, text: str) -> str:
        return hashlib.sha1(image).hexdigest() + text

    def answer(self, body: dict) -> tuple[int, dict, dict[str, str]]:
        content = body["messages"][0]["content"]
        image = base64.b64decode(content[0]["image_url"]["url"].split(",", 1)[1])
        text = content[1]["text"]
        index, example = self.plan[self.key(image, text)]
        with self.lock:
            self.calls[index] += 1
            self.bodies.append(body)
            calls = self.calls[index]
        behaviour = BEHAVIOURS[index % len(BEHAVIOURS)]
        if index in self.always_busy or (behaviour == "busy-once" and calls == 1):
            error = {"error": {"message": "overloaded", "type": "server_error", "code": "overloaded"}}
            return 503, error, {"Retry-After": "0.05"}
        x1, y1, x2, y2 = example.box
        truth = [x1 / example.width, y1 / example.height, x2 / example.width, y2 / example.height]
        elsewhere = [0.0, 0.0, 0.01, 0.01] if truth[0] > 0.1 or truth[1] > 0.1 else [0.9, 0.9, 1.0, 1.0]
        phrase, boxes = text, []
        if behaviour in ("correct", "busy-once"):
            boxes = [truth]
        elif behaviour == "wrong":
            boxes = [elsewhere]
        elif behaviour == "other-phrase":
            phrase, boxes = "something else", [truth]
        elif behaviour == "second-box":
            boxes = [elsewhere, truth]
        entities = [{"phrase": phrase, "span": [0, len(phrase)], "boxes": boxes, "boxes_px": boxes}] if boxes else []
        message = {"role": "assistant", "content": text, "entities": entities}
        return 200, self.completion(message), {}

    @staticmethod
    def completion(message: dict) -> dict:
        return {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "created": 0,
            "model": "stub-kosmos",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 70, "completion_tokens": 4, "total_tokens": 74},
        }


def handler_for(stub: Stub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def send(self, status: int, payload: dict, headers: dict[str, str]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self.send(200, {"status": "ok"}, {}) if self.path == "/health" else self.send(404, {}, {})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if stub.api_key and self.headers.get("Authorization") != f"Bearer {stub.api_key}":
                self.send(401, {"error": {"message": "bad key", "type": "authentication_error"}}, {})
                return
            self.send(*stub.answer(body))

    return Handler


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synth"), n=N, seed=7)


@pytest.fixture
def stub(synthetic) -> Iterator[tuple[Stub, str]]:
    service = Stub(load_mdetr(synthetic, synthetic.parent / "images"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(service))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield service, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def command(synthetic: Path, url: str, out: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--annotations",
        str(synthetic),
        "--images",
        str(synthetic.parent / "images"),
        "--predictor",
        "api",
        "--url",
        url,
        "--out",
        str(out),
        "--concurrency",
        "4",
        "--no-progress",
        *extra,
    ]


def expected() -> dict[str, int]:
    behaviours = [BEHAVIOURS[i % len(BEHAVIOURS)] for i in range(N)]
    return {
        "correct": sum(b in ("correct", "busy-once") for b in behaviours),
        "any_box_correct": sum(b in ("correct", "busy-once", "second-box") for b in behaviours),
        "no_box": sum(b in ("silent", "other-phrase") for b in behaviours),
        "phrase_mismatch": behaviours.count("other-phrase"),
        "no_object": behaviours.count("silent"),
    }


def test_scores_exactly_retries_503_and_sends_the_protocol(synthetic, stub, tmp_path):
    service, url = stub
    assert main(command(synthetic, url, tmp_path / "out")) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {k: summary[k] for k in expected()} == expected()
    assert summary["n"] == N and summary["errors"] == 0 and summary["complete"]
    busy = [i for i in range(N) if BEHAVIOURS[i % len(BEHAVIOURS)] == "busy-once"]
    assert all(service.calls[i] == 2 for i in busy) and sum(service.calls.values()) == N + len(busy)
    assert summary["config"]["retries"] == len(busy) and summary["config"]["served_model"] == "stub-kosmos"
    body = service.bodies[0]
    assert body["task"] == "ground" and body["no_repeat_ngram_size"] == 3 and body["temperature"] == 0.0
    assert body["max_tokens"] == 64 and body["messages"][0]["content"][1]["text"] in {
        e.expression for e in load_mdetr(synthetic, synthetic.parent / "images")
    }
    lines = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    second = next(
        line for i, line in enumerate(lines) if BEHAVIOURS[int(line["id"].split("/")[-1]) % 6] == "second-box"
    )
    assert not second["correct"] and second["any_box_correct"] and len(second["pred_boxes"]) == 2
    returned = second["entities"][0]  # the entity as the service returned it, span and pixel boxes included
    assert returned["span"] == [0, len(second["expression"])] and returned["boxes_px"] == returned["boxes"]
    assert second["text"] == second["expression"]  # the message's content
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"{expected()['phrase_mismatch']} phrase mismatches" in report
    assert f"{expected()['no_object']} with no object at all" in report


def test_resumes_from_a_partial_predictions_file(synthetic, stub, tmp_path):
    service, url = stub
    out = tmp_path / "out"
    assert main(command(synthetic, url, out)) == 0
    first = json.loads((out / "summary.json").read_text())
    path = out / "predictions.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:10]) + "\n" + lines[10][:25])  # a crash mid-write
    done = {json.loads(line)["id"] for line in lines[:10]}
    service.calls.clear()
    assert main(command(synthetic, url, out)) == 0
    again = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(again) == N and len({line["id"] for line in again}) == N
    asked = {f"synth/val/{i}" for i in service.calls}
    assert asked.isdisjoint(done) and len(asked) == N - 10
    second = json.loads((out / "summary.json").read_text())
    assert {k: second[k] for k in expected()} == {k: first[k] for k in expected()}
    assert second["timing"]["predicted"] == N - 10


def test_failures_are_recorded_then_retried_on_the_next_run(synthetic, stub, tmp_path, capsys):
    service, url = stub
    service.always_busy = {0}
    out = tmp_path / "out"
    assert main(command(synthetic, url, out, "--max-retries", "2")) == 1
    assert service.calls[0] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == 1 and not summary["complete"] and summary["correct"] == expected()["correct"] - 1
    assert "rerun to retry" in capsys.readouterr().out
    assert "Incomplete" in (out / "report.md").read_text()
    service.always_busy = set()
    service.calls.clear()
    assert main(command(synthetic, url, out)) == 0
    assert list(service.calls) == [0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["correct"] == expected()["correct"]


def test_api_key_from_the_environment_and_fatal_401(synthetic, stub, tmp_path, monkeypatch, capsys):
    service, url = stub
    service.api_key = "sekret"
    monkeypatch.setenv("KOSMOS_API_KEY", "wrong")
    assert main(command(synthetic, url, tmp_path / "a")) == 1  # a failure, not a usage error
    assert "401" in capsys.readouterr().err
    monkeypatch.setenv("KOSMOS_API_KEY", "sekret")
    assert main(command(synthetic, url, tmp_path / "b", "--limit", "6")) == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["n"] == 6


def test_another_predictors_output_is_not_mixed_in(synthetic, stub, tmp_path, capsys):
    _, url = stub
    out = tmp_path / "out"
    args = ["run", "--annotations", str(synthetic), "--images", str(synthetic.parent / "images"), "--out", str(out)]
    assert main([*args, "--predictor", "roundtrip", "--no-progress"]) == 0
    assert main(command(synthetic, url, out)) == 2
    assert "choose another --out" in capsys.readouterr().err

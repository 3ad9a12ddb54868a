"""Batch runs on Ray Data end to end, in the Ray of the live service (the ``service`` fixture) and with its config:
a batch file with every task and option and with bad lines, each answer equal to the service's for the same body;
a table of images whose engine process is killed mid-run; a folder interrupted and resumed. Every input gets
exactly one row, whatever happened to the run."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from bench.lab.batch_check import same
from serve.app.client import chat_request
from serve.batch import job as batch_job
from serve.batch.engine_worker import EngineWorker
from serve.batch.job import BatchJob, run
from tests.helpers import encode, photo

pytestmark = pytest.mark.slow

REGION = [0.1, 0.2, 0.6, 0.9]


def image(seed: int, fmt: str = "PNG") -> bytes:
    return encode(photo(72 + seed % 5 * 9, 54 + seed % 3 * 7, seed=seed), fmt)


def good_bodies(model: str) -> dict[str, dict]:
    """Requests of every task, with the fields the service honours (``model``: the served model's name)."""
    cases = {
        "caption": {"task": "caption"},
        "detailed": {"task": "detailed_caption"},
        "vqa": {"task": "vqa", "text": "what is in the picture?"},
        "vqa-by-default": {"text": "where is the disc?"},
        "ground": {"task": "ground", "text": "the disc"},
        "region": {"task": "describe_region", "region": REGION},
        "raw": {"task": "raw", "text": "<grounding> An image of"},
        "stop": {"task": "caption", "stop": ["e", "a "]},
        "logprobs": {"task": "vqa", "text": "what?", "logprobs": True, "top_logprobs": 3},
        "stop-logprobs": {"task": "ground", "text": "a dog", "stop": "o", "logprobs": True, "top_logprobs": 1},
        "sampled": {"task": "caption", "temperature": 0.9, "seed": 7, "top_p": 0.9},
        "bans": {"task": "detailed_caption", "no_repeat_ngram_size": 2},
        "fixed-length": {"task": "caption", "ignore_eos": True, "max_completion_tokens": 9},
        "default-length": {"task": "caption", "max_tokens": None},
    }
    bodies = {}
    for index, (name, fields) in enumerate(cases.items()):
        fields = {"max_tokens": 10, **fields}
        fields = {k: v for k, v in fields.items() if v is not None}
        body = chat_request(image(index, "JPEG" if index % 2 else "PNG"), **fields)
        body.pop("stream")
        bodies[name] = body
    bodies["system"] = {
        **bodies["caption"],
        "messages": [{"role": "system", "content": "Be brief."}, *bodies["caption"]["messages"]],
    }
    bodies["model"] = {**bodies["vqa"], "model": model}
    return bodies


def refused_bodies() -> dict[str, dict]:
    """Bodies the service answers with an error (the batch must answer each with the same)."""
    caption = chat_request(image(1), task="caption", max_tokens=5)
    caption.pop("stream")
    return {
        "bad-task": {**caption, "task": "dance"},
        "bad-top-p": {**caption, "top_p": 5},
        "unknown-field": {**caption, "frobnicate": 1},
        "two-choices": {**caption, "n": 2},
        "other-model": {**caption, "model": "gpt-4o"},
        "text-for-caption": chat_request(image(1), task="caption", text="why?"),
        "no-text-for-vqa": {**caption, "task": "vqa"},
        "region-elsewhere": {**caption, "region": REGION},
        "penalty": {**caption, "presence_penalty": 1.0},
        "not-base64": {
            **caption,
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}]}
            ],
        },
        "not-an-image": chat_request(b"plain text, no image", task="caption"),
        "too-long": {
            **caption,
            "task": "vqa",
            "max_tokens": 5,
            "messages": [
                {
                    "role": "user",
                    "content": [caption["messages"][0]["content"][0], {"type": "text", "text": "why " * 300}],
                }
            ],
        },
    }


def line(custom_id: str, body, **fields) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body, **fields})


BAD_LINES = [
    ("{this is not json", None, "invalid_json"),
    ('["a", "list"]', None, "invalid_json"),
    ('{"method": "POST", "url": "/v1/chat/completions", "body": {}}', None, "missing_custom_id"),
    (line("wrong-url", {}, url="/v1/embeddings"), "wrong-url", "invalid_url"),
    (line("wrong-method", {}, method="GET"), "wrong-method", "invalid_method"),
    ('{"custom_id": "cut-short", "method": "POST", "body": {"task": ', "cut-short", "invalid_json"),
]


def without_ids(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def test_a_batch_file_is_answered_as_the_service_answers(service, service_url, tmp_path):
    good, refused = good_bodies(service.served_model_name), refused_bodies()
    lines = [line(name, body) for name, body in {**good, **refused}.items()]
    lines.append(line("streamed", {**good["caption"], "stream": True}))
    for index, (text, _, _) in enumerate(BAD_LINES):
        lines.insert(3 * index + 1, text)
    lines.insert(5, "   ")  # blank: no request, no output line
    source, output = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    source.write_text("\n".join(lines) + "\n")
    summary = run(BatchJob(str(source), str(output)), service, progress=False)

    written = [json.loads(text) for text in output.read_text().splitlines()]
    assert len(written) == len(lines) - 1  # every line but the blank one, in input order
    assert [w["custom_id"] for w in written][:3] == ["caption", None, "detailed"]
    by_id = {w["custom_id"]: w for w in written if w["custom_id"] is not None}
    with httpx.Client(timeout=120) as client:
        for name, body in {**good, **refused}.items():
            live = client.post(f"{service_url}/v1/chat/completions", json=body)
            response = by_id[name]["response"]
            assert by_id[name]["error"] is None
            assert response["status_code"] == live.status_code, name
            assert response["request_id"] == response["body"].get("id", response["request_id"])
            assert same(without_ids(response["body"]), without_ids(live.json())), (name, response["body"], live.json())
            assert (live.status_code == 200) == (name in good), name
    streamed = by_id["streamed"]["response"]
    assert streamed["status_code"] == 400 and streamed["body"]["error"]["param"] == "stream"
    refusals = [w for w in written if w["error"] is not None]
    assert sorted((w["custom_id"] or "", w["error"]["code"]) for w in refusals) == sorted(
        (custom_id or "", code) for _, custom_id, code in BAD_LINES
    )
    assert all(w["response"] is None and w["error"]["message"] for w in refusals)
    point = summary["points"][0]
    assert (point["requests"], point["answered"]) == (len(lines) - 1, len(good))
    assert summary["kind"] == "batch" and summary["versions"]["ray"] == "2.60.0"
    assert not Path(f"{output}.batch/parts").exists()
    again = run(BatchJob(str(source), str(output)), service, progress=False)  # complete: nothing to redo
    assert again == summary and len(output.read_text().splitlines()) == len(written)


def answer_of(service_url: str, body: dict) -> dict:
    response = httpx.post(f"{service_url}/v1/chat/completions", json=body, timeout=120)
    if response.status_code != 200:
        return {"error_code": response.json()["error"]["code"] or response.json()["error"]["type"]}
    choice = response.json()["choices"][0]
    usage = response.json()["usage"]
    return {
        "text": choice["message"]["content"],
        "entities": choice["message"]["entities"],
        "finish_reason": choice["finish_reason"],
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
    }


def test_a_table_of_images_survives_a_killed_engine(service, service_url, tmp_path):
    (tmp_path / "photos").mkdir()
    rows = [
        {"id": "caption", "image": "photos/0.png"},
        {"id": "detailed", "image": "photos/1.jpg", "task": "detailed_caption"},
        {"id": "vqa", "image": "photos/2.png", "task": "vqa", "text": "what colour is it?"},
        {"id": "ground", "image": "photos/3.jpg", "task": "ground", "text": "the disc"},
        {"id": "region", "image": "photos/4.png", "task": "describe_region", "region": REGION},
        {"id": "raw", "image": "photos/5.jpg", "task": "raw", "text": "<grounding> An image of"},
        *({"id": f"more-{n}", "image": f"photos/{n}.{'jpg' if n % 2 else 'png'}"} for n in range(6, 30)),
        {"id": "unknown-task", "image": "photos/0.png", "task": "dance"},
        {"id": "missing", "image": "photos/absent.png"},
        {"id": "broken", "image": "photos/broken.png"},
        {"id": "text-for-caption", "image": "photos/0.png", "task": "caption", "text": "why?"},
        {"id": "text-means-vqa", "image": "photos/1.jpg", "text": "why?"},
    ]
    for n in range(30):
        (tmp_path / "photos" / f"{n}.{'jpg' if n % 2 else 'png'}").write_bytes(image(n, "JPEG" if n % 2 else "PNG"))
    (tmp_path / "photos" / "broken.png").write_bytes(b"\x89PNG but not really")
    pd.DataFrame(rows).to_parquet(tmp_path / "table.parquet")  # every row's columns (from_pylist takes the first's)
    marker = tmp_path / "engine-killed"

    class KillsItsEngineOnce(EngineWorker):
        """As the kernel's OOM killer would: the engine process dies while it holds the first block."""

        async def __call__(self, block):
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(self.engine._process.pid, signal.SIGKILL)
            return await super().__call__(block)

    output = tmp_path / "answers"
    job = BatchJob(
        str(tmp_path / "table.parquet"), str(output), images=True, options={"max_tokens": 8}, rows_per_file=8
    )
    summary = run(job, service, worker=KillsItsEngineOnce, progress=False)
    assert marker.exists()
    table = pd.read_parquet(output)
    assert sorted(table["id"]) == sorted(row["id"] for row in rows)  # each once
    table = table.set_index("id")
    errors = table["error_code"].dropna().to_dict()
    assert errors == {
        "unknown-task": "invalid_request_error",
        "missing": "invalid_image",
        "broken": "invalid_image",
        "text-for-caption": "invalid_request_error",
    }
    assert "task" in table.loc["unknown-task", "error"] and "absent.png" in table.loc["missing", "error"]
    for row in rows:
        if row["id"] in errors:
            continue
        fields = {"task": row.get("task"), "text": row.get("text"), "region": row.get("region"), "max_tokens": 8}
        body = chat_request(
            (tmp_path / row["image"]).read_bytes(), **{k: v for k, v in fields.items() if v is not None}
        )
        body.pop("stream")
        mine = table.loc[row["id"]]
        entities = [
            {
                **e,
                "span": list(e["span"]),
                "boxes": [list(b) for b in e["boxes"]],
                "boxes_px": [list(b) for b in e["boxes_px"]],
            }
            for e in mine["entities"]
        ]
        ours = {
            "text": mine["text"],
            "entities": entities,
            "finish_reason": mine["finish_reason"],
            "prompt_tokens": mine["prompt_tokens"],
            "completion_tokens": mine["completion_tokens"],
        }
        assert ours == answer_of(service_url, body), row["id"]
        assert mine["task"] == (row.get("task") or ("vqa" if row.get("text") else "caption"))
    assert summary["points"][0]["requests"] == len(rows)


def test_a_folder_interrupted_midway_resumes_without_loss_or_repeat(service, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    names = [f"{'sub/' if n % 4 == 0 else ''}{n:03d}.png" for n in range(48)]
    for n, name in enumerate(names):
        (folder / name).write_bytes(image(n))
    output = tmp_path / "captions"
    monkeypatch.setattr(batch_job, "IMAGE_BLOCK_ROWS", 4)  # many small tasks, so that some finish first

    class StopsTheRun(EngineWorker):
        """Fails its third call, once earlier calls' rows are written: the run stops with work in flight."""

        calls = 0

        async def __call__(self, block):
            self.calls += 1
            if self.calls == 3:
                deadline = time.monotonic() + 120
                while not list(output.glob("part-*.parquet")) and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                raise RuntimeError("the run is interrupted")
            return await super().__call__(block)

    job = BatchJob(str(folder), str(output), images=True, options={"task": "caption", "max_tokens": 6}, rows_per_file=4)
    with pytest.raises(Exception, match="the run is interrupted"):
        run(job, service, worker=StopsTheRun, progress=False)
    first = pd.read_parquet(output)
    assert 0 < len(first) < len(names) and first["id"].is_unique
    summary = run(job, service, progress=False)
    table = pd.read_parquet(output)
    assert sorted(table["id"]) == sorted(names) and table["error"].isna().all()
    point = summary["points"][0]
    assert point["skipped_done"] >= len(first) and point["skipped_done"] + point["requests"] == len(names)
    assert not [p for p in output.iterdir() if p.name.startswith(".tmp-")]

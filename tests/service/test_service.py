"""The real Serve application on 127.0.0.1 with the tiny model: every task, streaming, errors, concurrency.

Each answer is checked against the same request run in this process through the reference engine, token
for token (content, entities and usage derive from the tokens)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from serve.app.client import APIError, KosmosClient, chat_request
from serve.app.config import ServiceConfig
from serve.app.protocol import ChatCompletion, ChatCompletionChunk
from serve.engine.requests import GenerationRequest, SamplingParams
from serve.kosmos2.images import prepare_image
from serve.kosmos2.tasks import Task, build_prompt
from tests.helpers import LIMITS, encode, photo

pytestmark = pytest.mark.slow

CASES = [
    ("caption", None, None),
    ("detailed_caption", None, None),
    ("vqa", "What is on the left of the red square?", None),
    ("vqa", "Who?", None),
    ("ground", "the small dog next to the tree", None),
    ("describe_region", None, (0.1, 0.2, 0.5, 0.9)),
    ("raw", "<grounding> An image of<phrase> a cat</phrase>", None),
]


def expected_answer(codec, hf_engine, image: bytes, task: str, text, region, max_tokens: int, **params):
    """What the service must answer, computed in-process with the reference engine."""
    prepared = prepare_image(image, LIMITS)
    prompt = build_prompt(Task(task), text, region)
    ids = codec.encode(prompt.text)
    result = hf_engine.generate([GenerationRequest(prepared.pixels, ids, SamplingParams(max_tokens, **params))])[0]
    answer = codec.answer(prompt, ids.tolist(), result.token_ids, prepared.width, prepared.height)
    entities = [
        {
            "phrase": e.phrase,
            "span": list(e.span),
            "boxes": [list(b) for b in e.boxes],
            "boxes_px": [list(b) for b in e.boxes_px],
        }
        for e in answer.entities
    ]
    usage = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }
    return answer.text, entities, result.finish_reason, usage


def run(coroutine):
    return asyncio.run(coroutine)


def test_health_and_models(service, service_url):
    assert httpx.get(f"{service_url}/health").json() == {"status": "ok"}
    models = httpx.get(f"{service_url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [service.served_model_name]
    assert models["object"] == "list"


@pytest.mark.parametrize(("task", "text", "region"), CASES)
def test_every_task_answers_exactly(service_url, codec, hf_engine, task, text, region):
    image = encode(photo(300, 200, seed=len(task) + len(text or "")), "JPEG")

    async def call():
        async with KosmosClient(service_url) as client:
            return await client.complete(image, task=task, text=text, region=region, max_tokens=20)

    completion = run(call())
    ChatCompletion.model_validate(completion.raw)
    assert (completion.content, completion.entities, completion.finish_reason, completion.usage) == expected_answer(
        codec, hf_engine, image, task, text, region, 20
    )
    assert completion.usage["prompt_tokens"] >= 64 + 3  # the image tokens count


def test_grounded_entities_reach_the_client(service_url):
    """The region task's prompt carries a box, so its entity (and pixel box) is known in advance."""
    image = encode(photo(640, 480), "PNG")

    async def call():
        async with KosmosClient(service_url) as client:
            return await client.complete(image, task="describe_region", region=[0.5, 0.25, 1.0, 0.75], max_tokens=4)

    entity = run(call()).entities[0]
    # cells (16, 8) and (31, 23): centres at 16.5/32 .. 31.5/32 and 8.5/32 .. 23.5/32
    assert entity == {
        "phrase": "It",
        "span": [0, 2],
        "boxes": [[0.515625, 0.265625, 0.984375, 0.734375]],
        "boxes_px": [[330.0, 127.5, 630.0, 352.5]],
    }


def test_stream_equals_the_plain_answer(service_url):
    image = encode(photo(seed=9), "PNG")

    async def call():
        async with KosmosClient(service_url) as client:
            plain = await client.complete(image, task="vqa", text="what is it?", max_tokens=24)
            chunks = [chunk async for chunk in client.stream(image, task="vqa", text="what is it?", max_tokens=24)]
            return plain, chunks

    plain, chunks = run(call())
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    content = [c for c in chunks if c["choices"]]
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in content) == plain.content
    last = content[-1]["choices"][0]
    assert last["finish_reason"] == plain.finish_reason and last["delta"]["entities"] == plain.entities
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain.usage


def test_concurrent_requests_equal_requests_alone(service_url, codec, hf_engine):
    """Twelve requests of different prompt lengths at once: each gets exactly its answer alone."""
    questions = ["why?", "what colour is the large circle at the top left of the picture?", "is it big?"]
    jobs = [(encode(photo(200 + 10 * i, 160, seed=30 + i), "PNG"), questions[i % 3], 8 + 2 * i) for i in range(12)]

    async def call():
        async with KosmosClient(service_url) as client:
            return await asyncio.gather(
                *(client.complete(image, task="vqa", text=q, max_tokens=n) for image, q, n in jobs)
            )

    results = run(call())
    for (image, question, limit), got in zip(jobs, results, strict=True):
        expected = expected_answer(codec, hf_engine, image, "vqa", question, None, limit)
        assert (got.content, got.entities, got.finish_reason, got.usage) == expected


def test_seeded_sampling_repeats(service_url):
    image = encode(photo(seed=4), "PNG")

    async def call():
        async with KosmosClient(service_url) as client:
            return [
                await client.complete(image, task="caption", max_tokens=16, temperature=1.0, top_p=0.9, seed=5)
                for _ in range(2)
            ]

    first, second = run(call())
    assert first.content == second.content and first.usage == second.usage


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({"messages": []}, 400, "messages"),
        ({"model": "gpt-4o"}, 404, "model"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"max_tokens": 100_000}, 400, "max_tokens"),
        ({"temperature": 3}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"n": 2}, 400, "n"),
        ({"task": "translate"}, 400, "task"),
        ({"task": "describe_region"}, 400, "region"),
        ({"task": "describe_region", "region": [0.5, 0.5, 0.1, 0.9]}, 400, "region"),
        ({"task": "caption", "region": [0, 0, 1, 1]}, 400, "region"),
        ({"image": b"not an image"}, 400, "image_url"),
        ({"url": "data:image/png;base64,@@@@"}, 400, "image_url"),
        ({"url": "file:///etc/passwd"}, 400, "image_url"),
        ({"url": "https://example.com/cat.png"}, 400, "image_url"),
    ],
)
def test_bad_requests_get_the_envelope(service_url, body, status, param):
    if isinstance(body, dict):
        options = dict(body)
        image = options.pop("image", encode(photo(64, 64), "PNG"))
        url = options.pop("url", None)
        request = chat_request(image, **{"task": "caption", **options})
        if "messages" in options:
            request["messages"] = options["messages"]
        if url is not None:
            request["messages"][0]["content"][0]["image_url"]["url"] = url
        body = json.dumps(request).encode()
    response = httpx.post(
        f"{service_url}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    # the server keeps serving
    ok = httpx.post(f"{service_url}/v1/chat/completions", json=chat_request(encode(photo(64, 64)), max_tokens=2))
    assert ok.status_code == 200


def test_unknown_route_and_oversized_body(service, service_url):
    missing = httpx.get(f"{service_url}/v1/embeddings")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    huge = b"x" * (service.limits.max_body_bytes + 1)
    too_large = httpx.post(f"{service_url}/v1/chat/completions", content=huge)
    assert too_large.status_code == 413 and too_large.json()["error"]["type"] == "invalid_request_error"


def test_streams_fail_before_opening(service_url):
    body = chat_request(b"GIF89a-truncated", task="caption", stream=True)
    response = httpx.post(f"{service_url}/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["param"] == "image_url"


def test_client_errors_do_not_raise_in_the_client_helpers(service_url):
    async def call():
        async with KosmosClient(service_url) as client:
            await client.complete(b"nope", task="caption")

    with pytest.raises(APIError) as info:
        run(call())
    assert info.value.status == 400 and info.value.code == "invalid_image"


def test_generator_falls_back_to_the_cpu_without_gpus(service):
    """This cluster has no GPU: a Generator asking for one runs on CPUs (with a warning), unless told not to."""
    from serve.app.builder import generator_resources

    generator = service.model_dump()["generator"]
    generator["ray_actor_options"]["num_gpus"] = 1.0
    wants_gpu = ServiceConfig.model_validate({**service.model_dump(), "generator": generator})
    assert generator_resources(wants_gpu).num_gpus == 0
    strict = wants_gpu.model_copy(update={"cpu_fallback": False})
    assert generator_resources(strict).num_gpus == 1
    pixels = strict.model_copy(update={"engine": strict.engine.model_copy(update={"kind": "pixels"})})
    assert generator_resources(pixels).num_gpus == 0  # the pixel engine runs on the CPU

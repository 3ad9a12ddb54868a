"""Serve's replica counts: finding Ray's auth token, sending it, and saying what to do when it is refused."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from bench.commands import serve_api_token
from bench.replicas import ReplicaPoller, ray_auth_token

TOKEN = "s3cret"
PAYLOAD = {
    "applications": {
        "kosmos2": {"deployments": {"Generator": {"status": "HEALTHY", "target_num_replicas": 1, "replicas": []}}}
    }
}


def test_the_token_is_found_where_ray_looks_for_it(tmp_path):
    default, named = tmp_path / "auth_token", tmp_path / "named"
    default.write_text("from-default\n")
    named.write_text("from-path\n")
    assert ray_auth_token({}, default) == "from-default"
    assert ray_auth_token({"RAY_AUTH_TOKEN_PATH": str(named)}, default) == "from-path"
    assert ray_auth_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(named)}, default) == "from-env"
    assert ray_auth_token({"RAY_AUTH_TOKEN": "  "}, tmp_path / "absent") is None
    (tmp_path / "empty").write_text("\n")
    assert ray_auth_token({}, tmp_path / "empty") is None


def test_a_named_token_file_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    (tmp_path / "token").write_text(f"{TOKEN}\n")
    assert serve_api_token(tmp_path / "token") == TOKEN
    assert serve_api_token(None) == "from-env"


def poll_once(token: str | None) -> ReplicaPoller:
    """One poll against a dashboard that wants ``Authorization: Bearer TOKEN``."""

    def dashboard(request: httpx.Request) -> httpx.Response:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return httpx.Response(401, text="Unauthorized: missing or invalid authentication token")
        return httpx.Response(200, json=PAYLOAD)

    poller = ReplicaPoller("http://127.0.0.1:8265", clock=lambda: 1.5, token=token)

    async def poll() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(dashboard), headers=poller.headers) as http:
            await poller.poll(http)

    asyncio.run(poll())
    return poller


def test_the_token_is_sent_as_a_bearer_header():
    poller = poll_once(TOKEN)
    assert poller.failures == 0
    [sample] = poller.samples
    assert (sample.t_s, sample.deployment, sample.target_replicas) == (1.5, "Generator", 1)


@pytest.mark.parametrize("token", [None, "wrong"])
def test_a_refused_token_says_how_to_pass_one(token, caplog):
    with caplog.at_level(logging.WARNING, logger="bench.replicas"):
        poller = poll_once(token)
    assert poller.samples == [] and poller.failures == 1
    [record] = caplog.records
    assert "401" in record.message and "--serve-api-token-file" in record.message

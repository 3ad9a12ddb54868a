"""Replica counts over time, from Ray Serve's own REST API, for autoscaling runs.

``ReplicaPoller`` asks ``GET {serve_api}/api/serve/applications/`` (the Ray dashboard, by default
``http://127.0.0.1:8265``) every ``interval_s`` while a run lasts, and keeps one :class:`ReplicaSample` per
deployment per poll: its target replica count and how many replicas are RUNNING. An absent or failing API
records nothing and warns once; the run goes on. With Ray's token authentication on, pass the token
(``--serve-api-token``); it is sent as ``Authorization: Bearer``.

    >>> payload = {"applications": {"kosmos": {"deployments": {"Generator": {
    ...     "status": "UPSCALING", "target_num_replicas": 3,
    ...     "replicas": [{"state": "RUNNING"}, {"state": "RUNNING"}, {"state": "STARTING"}]}}}}}
    >>> [sample] = parse_replicas(payload, 12.5)
    >>> sample.t_s, sample.application, sample.deployment, sample.target_replicas, sample.running_replicas
    (12.5, 'kosmos', 'Generator', 3, 2)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

log = logging.getLogger(__name__)

APPLICATIONS_PATH = "/api/serve/applications/"


@dataclass
class ReplicaSample:
    """One deployment's replicas at one moment (seconds from the start of the run)."""

    t_s: float
    application: str
    deployment: str
    status: str
    target_replicas: int
    running_replicas: int


def parse_replicas(payload: dict[str, Any], t_s: float) -> list[ReplicaSample]:
    """The samples in one answer of Serve's applications endpoint (``ServeInstanceDetails``)."""
    samples = []
    for app_name, app in (payload.get("applications") or {}).items():
        for name, deployment in (app.get("deployments") or {}).items():
            replicas = deployment.get("replicas") or []
            samples.append(
                ReplicaSample(
                    t_s,
                    app_name,
                    name,
                    str(deployment.get("status", "")),
                    int(deployment.get("target_num_replicas", len(replicas))),
                    sum(r.get("state") == "RUNNING" for r in replicas),
                )
            )
    return samples


class ReplicaPoller:
    """Polls Serve's REST API on a fixed interval; ``samples`` holds what it saw."""

    def __init__(
        self, serve_api: str, clock: Callable[[], float], interval_s: float = 1.0, token: str | None = None
    ) -> None:
        self.url = serve_api.rstrip("/") + APPLICATIONS_PATH
        self.clock = clock
        self.interval_s = interval_s
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.samples: list[ReplicaSample] = []
        self.failures = 0

    async def run(self) -> None:
        """Poll until cancelled."""
        async with httpx.AsyncClient(timeout=max(1.0, self.interval_s), headers=self.headers) as http:
            while True:
                started = self.clock()
                await self.poll(http)
                await asyncio.sleep(max(0.0, self.interval_s - (self.clock() - started)))

    async def poll(self, http: httpx.AsyncClient) -> None:
        t_s = self.clock()
        try:
            response = await http.get(self.url)
            response.raise_for_status()
            self.samples.extend(parse_replicas(response.json(), t_s))
        except (httpx.HTTPError, ValueError, AttributeError, TypeError) as exc:
            if not self.failures:
                log.warning("no replica counts from %s (%s); the run goes on without them", self.url, exc)
            self.failures += 1

"""Replica counts over time, from Ray Serve's own REST API, for autoscaling runs.

``ReplicaPoller`` asks ``GET {serve_api}/api/serve/applications/`` (the Ray dashboard, by default
``http://127.0.0.1:8265``) every ``interval_s`` while a run lasts, and keeps one :class:`ReplicaSample` per
deployment per poll: its target replica count and how many replicas are RUNNING. An absent or failing API
records nothing and warns once; the run goes on.

Ray 2.60 turns token authentication on by default, and the dashboard then answers 401 without the token. The
token is sent as ``Authorization: Bearer``; ``--serve-api-token-file`` names its file, and without it
:func:`ray_auth_token` finds it where Ray's own clients look (``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``).

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
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger(__name__)

APPLICATIONS_PATH = "/api/serve/applications/"

DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
"""Where ``ray start`` and ``ray.init`` keep the cluster's token when no environment variable names one."""


def ray_auth_token(environ: Mapping[str, str] | None = None, default_file: Path = DEFAULT_TOKEN_FILE) -> str | None:
    """The Ray auth token as Ray's clients find it, or None when there is none.

    >>> ray_auth_token({"RAY_AUTH_TOKEN": " abc\\n"}), ray_auth_token({}, Path("/nonexistent"))
    ('abc', None)
    """
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    path = Path(environ.get("RAY_AUTH_TOKEN_PATH") or default_file).expanduser()
    return (path.read_text().strip() or None) if path.is_file() else None


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
                log.warning("no replica counts from %s (%s)%s; the run goes on without them", self.url, exc, _hint(exc))
            self.failures += 1


def _hint(exc: Exception) -> str:
    """What to do about a refusal by Ray's token authentication."""
    if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (401, 403):
        return (
            ": Ray's token authentication refused the request; pass the cluster's token file with "
            "--serve-api-token-file (or set RAY_AUTH_TOKEN)"
        )
    return ""


def replica_changes(samples: Sequence[ReplicaSample]) -> list[ReplicaSample]:
    """Each deployment's first sample and every sample whose target or running count differs from the one
    before it (in time order): when the autoscaler decided, and when the replicas came or went.

    >>> s = [ReplicaSample(t, "a", "G", "", target, running) for t, target, running in
    ...      [(0, 1, 1), (1, 1, 1), (2, 2, 1), (3, 2, 1), (4, 2, 2), (5, 1, 1)]]
    >>> [(c.t_s, c.target_replicas, c.running_replicas) for c in replica_changes(s)]
    [(0, 1, 1), (2, 2, 1), (4, 2, 2), (5, 1, 1)]
    """
    last: dict[tuple[str, str], tuple[int, int]] = {}
    changes = []
    for sample in sorted(samples, key=lambda s: s.t_s):
        key, counts = (sample.application, sample.deployment), (sample.target_replicas, sample.running_replicas)
        if last.get(key) != counts:
            changes.append(sample)
            last[key] = counts
    return changes

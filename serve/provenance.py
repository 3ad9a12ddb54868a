"""Where a result came from: schema version, git commit, package versions and hardware.

Every result file the bench and the batch mode write starts from :func:`provenance`, so a number can always be
traced to the code, the libraries and the machine that produced it. Nothing here imports torch or Ray: versions are read
from the installed packages' metadata, and the GPU name from torch only when it is already imported (the
engine modes), else from ``nvidia-smi`` when it is on the PATH.

    >>> sorted(provenance({"duration_s": 30})) == ["config", "git_commit", "hardware", "schema_version", "versions"]
    True
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
"""Version of the layout of every result file (bench output folders, batch summaries); bump it when a field changes
meaning."""

PACKAGES = ("torch", "transformers", "ray", "aiohttp", "httpx", "numpy", "pillow", "kosmos2-serve")
"""Packages whose versions every result records (absent ones are recorded as null)."""

REPO = Path(__file__).resolve().parent.parent


def provenance(config: dict[str, Any]) -> dict[str, Any]:
    """The header of every result file: schema version, the run's config, git commit, versions, hardware."""
    return {
        "schema_version": SCHEMA_VERSION,
        "config": config,
        "git_commit": git_commit(),
        "versions": versions(),
        "hardware": hardware(),
    }


def git_commit() -> str | None:
    """``git rev-parse HEAD`` of the checkout this package runs from, with ``-dirty`` for local changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


def versions() -> dict[str, str | None]:
    """Python's version and each of :data:`PACKAGES`' (null when not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def hardware() -> dict[str, Any]:
    """CPU model, logical cores, memory and GPU names of this machine."""
    return {
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpus": gpu_names(),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """Names of the CUDA devices: from torch if it is already imported, else from ``nvidia-smi``."""
    torch = sys.modules.get("torch")
    if torch is not None:
        if not torch.cuda.is_available():
            return []
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=20,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]

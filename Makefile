# Everything runs from the project's own virtual environment, created on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= microsoft/kosmos-2-patch14-224
TINY ?= .cache/tiny-kosmos2

.PHONY: install test compat lint demo serve bench tiny clean

install: $(STAMP)

# A CPU build of torch where there is no NVIDIA GPU keeps the install small, and Triton there runs the attention
# kernel's tests in its interpreter (a GPU's torch brings its own Triton); the constraints pin what CI tested.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	command -v nvidia-smi >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0
	command -v nvidia-smi >/dev/null 2>&1 || $(PY) -m pip install -q triton==3.9.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# ruff, then pytest offline (doctests included); the multi-node tests own a Ray cluster, so run on their own.
test: $(STAMP)
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not multinode"
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m multinode tests/service/test_multinode.py

# The same suite on the GPU machines' releases (torch 2.11, transformers 5.17) in a venv of its own, on the CPU;
# not part of `make test`: PyPI's torch 2.11 is a CUDA build of several GB.
COMPAT ?= .venv-compat
compat:
	test -x $(COMPAT)/bin/python || python3 -m venv $(COMPAT)
	grep -v '^transformers==' constraints.txt > $(COMPAT)/constraints.txt
	$(COMPAT)/bin/python -m pip install -q -c $(COMPAT)/constraints.txt -e '.[dev]' torch==2.11.0
	$(COMPAT)/bin/python -m pip install -q transformers==5.17.0
	HF_HUB_OFFLINE=1 $(COMPAT)/bin/python -m pytest -q -m "not multinode"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

tiny: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m serve tiny $(TINY)

# The tiny offline model served locally, one request per task with the openai client, the answers' boxes drawn
# on the image (out/demo.png), then a clean stop. ENGINE=pixels: the pixel engine, whose answers box a red disc.
ENGINE ?=
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m serve demo $(if $(ENGINE),--engine $(ENGINE))

# The tiny model served locally, a short closed-loop sweep (concurrency 1 and 4, 5 s each), the usual result
# files in out/bench, then a clean stop, also on failure or Ctrl-C.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m bench demo --out out/bench

# Serve MODEL in the foreground (the real checkpoint needs the hub or a local copy, and a GPU to be fast).
serve: $(STAMP)
	$(PY) -m serve run --model $(MODEL)

clean:
	rm -rf $(VENV) .cache build *.egg-info

# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision pinned exactly (an unpinned torch pulls several GB of CUDA wheels).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# Every optional part too (wsi, vlm, survival, stain, lora): demo and tests use them all.
	$(PY) -m pip install -q -e ".[all,dev]"
	touch $@

demo: setup
	$(VENV)/bin/medfoundry run configs/demo/breastmnist_simclr.yaml

test: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/breastmnist_dino.py

clean:
	rm -rf runs .pytest_cache

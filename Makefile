# The project's own setup: everything the pipeline and the tests need comes from these targets.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FASHION_MNIST_DEBIAN := /usr/share/datasets/fashion-mnist

.PHONY: setup offline-data repro lint test clean-venv

setup: $(STAMP)

# Re-running when requirements.lock and pyproject.toml are unchanged does nothing (seconds).
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-deps -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# FashionMNIST without internet: Debian's dataset-fashion-mnist (the same files torchvision downloads).
offline-data:
	@if [ ! -d $(FASHION_MNIST_DEBIAN) ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	fi

# The main job: every DVC stage (interpreter-sized on a machine without a GPU, full size with one).
repro: setup offline-data
	PATH=$(abspath $(VENV))/bin:$$PATH dvc repro

# The correctness suite: through Triton's interpreter without a GPU, natively (bf16 included) with one.
# Lint and format check (ruff, configured in pyproject.toml); `$(VENV)/bin/ruff format .` applies the format.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup
	$(PY) -m pytest -n 2 -q tests

clean-venv:
	rm -rf $(VENV)

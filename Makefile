# `make test` and `make demo` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned for the CPU venv (taken from the local disk where present)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: test demo install clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.hpp)
	$(BIN)/python -m pip install -q $(TORCH_PINS) setuptools wheel "pybind11>=2.10"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

demo: $(VENV)/.installed
	$(BIN)/vggfast demo

bench: $(VENV)/.installed
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info vggfast/*.so

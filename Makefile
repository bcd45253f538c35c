# Two entry points (see README): `make demo` and `make test`. Each creates .venv and installs what it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: 2.13.0 is the CPU build this environment serves; a looser spec would fetch a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup setup-dev demo tour test test-fast clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[train]"

setup-dev: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[train,dev,tensorrt-rtx]"

# The shipped shapes model (models/shapes-demo, or $LDM_DEPLOY_DEMO_MODEL) -> outputs/demo/{grid.png,images/,report.json}.
demo: setup
	$(BIN)/ldm-deploy demo

# The README's tour on the tiny preset: train -> export -> validate -> build -> generate, about a minute on CPU.
tour: setup
	BIN=$(BIN) bash scripts/quickstart.sh

test: setup-dev
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

test-fast: setup-dev
	$(BIN)/python -m pytest -n 2 --dist loadfile -q -m "not slow"

clean:
	rm -rf $(VENV) outputs .pytest_cache

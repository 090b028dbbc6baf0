# switchyard: `make run` starts the whole local stack, `make test` runs the suite.
# Both install what they need (Python venv under .venv, redis-server from Debian).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint unit integration bench deps clean

run: deps
	$(VENV)/bin/switchyard up

test: deps lint
	$(PY) -m pytest -q

lint: deps
	$(VENV)/bin/ruff check router actors scheduler analytics deploy loadtests tests

unit: deps
	$(PY) -m pytest -q -m "not integration"

integration: deps
	$(PY) -m pytest -q -m integration

bench: deps
	$(PY) -m loadtests.bench_latency

deps: $(STAMP) /usr/bin/redis-server

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

/usr/bin/redis-server:
	apt-get update -qq && apt-get install -y -qq redis-server

clean:
	rm -rf $(VENV) var

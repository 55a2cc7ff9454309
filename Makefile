# Two commands set everything up on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: install tools system-deps run test lint bench image migrate clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

# System tools the node and its tests start: PostgreSQL server binaries, promtool.
system-deps:
	@bash scripts/system-deps.sh

run: install system-deps
	$(PY) -m devstack

# Lint tools whose pins clash with the node's (checkov) live in their own virtualenv; tests/test_deploy.py uses it.
tools: .venv-tools/.installed

.venv-tools/.installed: deploy/requirements-tools.txt
	python3 -m venv .venv-tools
	.venv-tools/bin/python -m pip install -q --disable-pip-version-check -r deploy/requirements-tools.txt
	touch $@

test: install system-deps tools
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: install system-deps
	$(PY) -m devstack.bench

migrate: install
	$(PY) -m services.billing migrate
	$(PY) -m services.wallet migrate
	$(PY) -m services.discovery migrate

image:
	docker build -f deploy/Dockerfile -t routstr-node:dev .

clean:
	rm -rf .run .pytest_cache .ruff_cache

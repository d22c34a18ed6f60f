# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs reelfarm (torch pinned to the CPU wheel) first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: demo test install bench clean lint

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c infra/requirements.lock -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/reelfarm demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install -q -c infra/requirements.lock -e ".[test,bench]"
	$(PY) -m bench

lint: $(STAMP)
	$(PY) -m ruff check reelfarm tests bench
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

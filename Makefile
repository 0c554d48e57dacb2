# Two entry points for a fresh machine: `make run` and `make test`.
VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip
# The CPU build of torch keeps installs lean here; on a GPU machine use `make TORCH_SPEC=torch run`.
TORCH_SPEC ?= torch==2.13.0
RUN_ARGS  ?=

.PHONY: run test setup setup-test clean

$(VENV)/.core: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.core
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps "torch-fidelity>=0.3"
	touch $@

setup: $(VENV)/.core
setup-test: $(VENV)/.test

run: $(VENV)/.core
	$(VENV)/bin/flowrail run $(RUN_ARGS)

test: $(VENV)/.test
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

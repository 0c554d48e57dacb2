# Two entry points for a fresh machine: `make run` and `make test`.
VENV      ?= .venv
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip
# The CPU build of torch keeps installs lean here; on a GPU machine use `make TORCH_SPEC=torch run`.
TORCH_SPEC ?= torch==2.13.0
RUN_ARGS  ?=

.PHONY: run test test-e2e test-all setup setup-test clean

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

# `make test`: everything except the end-to-end acceptance tests marked `slow`. `make test-e2e`: only those (SIGKILL
# resume, 2-node cluster, sweep, 2-worker FLUX, privacy, tracking outage, chaos rows of docs/RELIABILITY.md...),
# without the `exhaustive` per-combination variants; CI (.ci/run) runs both tiers. `make test-all`: everything.
# pytest's exit status 5 ("no tests collected") counts as a pass for a tier.
test: $(VENV)/.test
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS) || [ $$? -eq 5 ]

# E2E_PENDING: end-to-end tests to leave out of CI until one run on main shows them green (empty: every slow test
# runs). `make test-e2e E2E_PENDING=` runs them all whatever it holds.
E2E_PENDING ?=

test-e2e: $(VENV)/.test
	$(PY) -m pytest tests -m "slow and not exhaustive" --durations=0 $(foreach t,$(E2E_PENDING),--deselect $(t)) \
		$(PYTEST_ARGS) || [ $$? -eq 5 ]

test-all: $(VENV)/.test
	$(PY) -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

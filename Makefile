# Developer entry points; `make test` runs what CI runs (.ci/run, in a fresh venv).
#   make demo [DEMO_ARGS="--devices 3 --duration 0"]   make test   make check

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
DEMO_ARGS ?=

.PHONY: demo test check

$(PY):
	$(PYTHON) -m venv $(VENV)

# One stamp per set of extras: pip runs again only when pyproject.toml changes, or the C
# accelerator's source (an editable install compiles it once).
$(VENV)/.installed-base: pyproject.toml setup.py crdtsync/_speedups.c | $(PY)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-%: pyproject.toml setup.py crdtsync/_speedups.c | $(PY)
	$(PIP) -e '.[$*]'
	touch $@

demo: $(VENV)/.installed-base
	$(VENV)/bin/crdtsync demo $(DEMO_ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

check: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

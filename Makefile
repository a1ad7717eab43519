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

# The sources pip compiles (crdtsync._compiled.MODULES, read from the file's text).
COMPILED := crdtsync/_speedups.c crdtsync/_logsync.c crdtsync/_compiled.py $(shell $(PYTHON) -c "import ast, \
  pathlib; t = ast.parse(pathlib.Path('crdtsync/_compiled.py').read_text()); m = next(n.value \
  for n in t.body if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == 'MODULES'); \
  print(' '.join(('server/' if x.startswith('crdtsync_server') else '') + x.replace('.', '/') \
  + '.py' for x in ast.literal_eval(m)))")

# One stamp per set of extras: pip runs again only when pyproject.toml changes, or a source
# it compiles (an editable install compiles them once; a stale build runs as Python).
$(VENV)/.installed-base: pyproject.toml setup.py $(COMPILED) | $(PY)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-%: pyproject.toml setup.py $(COMPILED) | $(PY)
	$(PIP) -e '.[$*]'
	touch $@

demo: $(VENV)/.installed-base
	$(VENV)/bin/crdtsync demo $(DEMO_ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

check: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

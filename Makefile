# Two commands do everything on a fresh machine (Python 3.11+):
#   make repro   set up .venv, then run the pipeline (dvc repro)
#   make test    set up .venv, then run the test suite
#   make lint    ruff (lint) and mypy, as CI runs them before the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup repro test lint lock clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# Two workers (pytest-xdist); each test module stays on one worker, so a module's
# pipeline project is built once. Modules go out in conftest's order (the long ones
# first), not by test count. XDIST= runs serially; PYTEST_ARGS adds options.
XDIST ?= -n 2 --dist loadscope --no-loadscope-reorder
# pytest exits 5 when it collects nothing (e.g. a filtered run); that is not a failure.
test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

lock: $(STAMP)
	{ sed -n '1,5p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable \
	  | grep -v '^sabia\|^liger-kernel==' | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/'; } > constraints.new && mv constraints.new constraints.txt

clean-venv:
	rm -rf $(VENV)

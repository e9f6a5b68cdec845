# The README's two commands. Both create .venv with `python3 -m venv` when it is missing.
#   make run   install with the dev extra, then run the whole service (python -m app.devstack)
#   make test  install with the test and bench extras, then lint, format check, types and every test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test

run: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m app.devstack

# -m "" selects every test, slow and fault ones included, whatever addopts says.
test: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -m ""

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "mailqueue needs Python 3.11 or newer; $(PYTHON) is older (try: make PYTHON=python3.11 ...)"; exit 1; }
	@echo "creating $(VENV) with $(PYTHON) -m venv"
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "python3 -m venv failed: on Debian/Ubuntu install it with: apt-get install python3-venv"; exit 1; }

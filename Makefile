# The two commands a fresh machine needs (see README): `make quickstart` and `make test`.
# Both create .venv and install hemcap with pinned versions (constraints.txt keeps torch on the
# CPU wheel instead of a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install quickstart test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/hemcap quickstart

test: $(STAMP)
	$(BIN)/pytest -ra

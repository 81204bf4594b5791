# The two commands a fresh machine needs (see README): `make quickstart` and `make test`.
# Both create .venv and install hemcap with pinned versions (constraints.txt keeps torch on the
# CPU wheel instead of a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install quickstart test browser

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,demo,qlora]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/hemcap quickstart

# The browser test drives Debian's chromium (never `playwright install`, which downloads a browser).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
		echo "chromium not installed: the browser test will skip"

test: $(STAMP) browser
	$(BIN)/pytest -ra

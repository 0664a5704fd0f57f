# iiot — set-up, checks, tests and the demo. Every target sets up what it needs.
PYTHON ?= python3
VENV   ?= .venv
DIST   ?= dist
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: all setup system-deps check lint typecheck deadcode test test-fast demo bench dist clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,postgres]'
	touch $(STAMP)

setup: $(STAMP)

# Servers the integration tests run on loopback, and the CJK fonts headless Chromium
# renders the dashboard with (Debian packages; needs root).
system-deps:
	@missing=""; \
	for cmd in mosquitto:mosquitto victoria-metrics:victoria-metrics socat:socat chromium:chromium curl:curl node:nodejs npm:npm; do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v $${cmd%%:*} >/dev/null 2>&1 || missing="$$missing $${cmd##*:}"; \
	done; \
	dpkg -s fonts-noto-cjk >/dev/null 2>&1 || missing="$$missing fonts-noto-cjk"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck deadcode

# Unused code; names reached by a framework are listed in vulture_whitelist.py.
deadcode: $(STAMP)
	$(BIN)/vulture

test: setup system-deps check
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -x

demo: setup
	$(BIN)/iiot demo

# The wheel and sdist the guides install (into a virtual environment, e.g. /opt/iiot).
dist: setup
	rm -f $(DIST)/iiot-*.whl $(DIST)/iiot-*.tar.gz
	$(BIN)/python -m build --outdir $(DIST) .

bench: setup system-deps
	$(BIN)/python bench/agent_modbus.py
	$(BIN)/python bench/gateway_ingest.py
	$(BIN)/python bench/ratios.py
	$(BIN)/python bench/sparkplug_wire.py
	$(BIN)/python bench/ratios.py --instances 3

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache iiot-data build $(DIST)

# citynode: every target installs what it needs first, so a fresh clone needs nothing else.
#   make demo    the whole system on one machine (embedded defaults)
#   make test    the whole test suite, emulated boards included
#   sudo make install-gateway   on a pole: the gateway as a systemd service

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# systemd: its systemd-analyze checks the shipped unit (tests/test_gateway_deploy.py);
# chrony: the pole's time server for its nodes (deploy/chrony.conf), in tests and the demo
APT_PACKAGES := mosquitto systemd chrony

PORT  ?=
BOARD ?= esp32-devkitc
DEMO_ARGS ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

.PHONY: setup test hil demo bench bench-firmware bench-gateway bench-provision bench-throttle bench-events lint flash provision install-gateway clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || \
	    missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

test: setup
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

hil: setup
ifeq ($(PORT),)
	$(BIN)/pytest hil_tests $(PYTEST_ARGS)
else
	$(BIN)/pytest hil_tests --port $(PORT) --board $(BOARD) $(PYTEST_ARGS)
endif

demo: setup
	$(BIN)/python -m citynode.demo $(DEMO_ARGS)

bench: bench-firmware bench-gateway bench-provision bench-throttle bench-events
	$(BIN)/python -m bench.table

bench-firmware bench-gateway bench-provision bench-throttle bench-events: setup
	$(BIN)/python -m bench.$(subst -,_,$(subst bench-,,$@)) --out bench/results

lint: setup
	$(BIN)/ruff check .

ARGS ?=
flash provision: setup
	$(BIN)/citynode-provision $@ --port $(PORT) --board $(BOARD) $(ARGS)

# On the pole (a Raspberry Pi): the gateway, the locked broker and the unit, where the
# unit expects them (deploy/install-gateway.sh). DESTDIR=DIR stages it under DIR only.
DESTDIR ?=
SOURCE  ?=
install-gateway:
	DESTDIR="$(DESTDIR)" SOURCE="$(SOURCE)" PYTHON="$(PYTHON)" sh deploy/install-gateway.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

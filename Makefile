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
# chrony: the pole's time server for its nodes (deploy/chrony.conf), in tests and the demo;
# gcc, libc6-dev: the emulated board's clock at chip speed (emulator/chipclock.c)
APT_PACKAGES := mosquitto systemd chrony gcc libc6-dev
# systemd-nspawn boots the container of `make test-systemd`
SYSTEMD_TEST_PACKAGES := systemd-container

PORT  ?=
BOARD ?= esp32-devkitc
DEMO_ARGS ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= 3

.PHONY: setup test test-systemd hil demo bench bench-firmware bench-gateway bench-provision bench-throttle bench-events bench-ota lint flash provision install-gateway clean

# A recipe line: apt-get installs those of the Debian packages $(1) that are missing.
define apt_install
@missing=""; for p in $(1); do \
  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || \
    missing="$$missing $$p"; done; \
if [ -n "$$missing" ]; then \
  echo "installing Debian packages:$$missing"; \
  $(SUDO) apt-get update -qq && \
  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
fi
endef

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(call apt_install,$(APT_PACKAGES))
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

test: setup
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# Opt-in (issue 12): the shipped unit under a real systemd, PID 1 of a container that this
# host boots (systemd-nspawn), after `make install-gateway` in it as on a Pi; about
# 50 s; needs root and a kernel that lets a container boot systemd (tests/systemd/)
test-systemd: setup
	$(call apt_install,$(SYSTEMD_TEST_PACKAGES))
	$(SUDO) $(BIN)/pytest tests/systemd $(PYTEST_ARGS)

hil: setup
ifeq ($(PORT),)
	$(BIN)/pytest hil_tests $(PYTEST_ARGS)
else
	$(BIN)/pytest hil_tests --port $(PORT) --board $(BOARD) $(PYTEST_ARGS)
endif

demo: setup
	$(BIN)/python -m citynode.demo $(DEMO_ARGS)

bench: bench-firmware bench-gateway bench-provision bench-throttle bench-events bench-ota
	$(BIN)/python -m bench.table

bench-firmware bench-gateway bench-provision bench-throttle bench-events bench-ota: setup
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

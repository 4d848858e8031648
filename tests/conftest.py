"""Shared fixtures: emulated boards and real Mosquitto brokers (citynode.testing)."""

from __future__ import annotations

import pytest

from citynode.mosquitto import Mosquitto
from citynode.testing.emulator import start_emulator


@pytest.fixture
def local_broker(tmp_path):
    """The pole's broker: persistence on, as deploy/mosquitto.conf has it."""
    with Mosquitto(tmp_path / "local-broker", persistence=True) as broker:
        yield broker


@pytest.fixture
def upstream_broker(tmp_path):
    """The city's broker."""
    with Mosquitto(tmp_path / "upstream-broker", persistence=True) as broker:
        yield broker


@pytest.fixture
def emu_board(tmp_path):
    """One emulated esp32-devkitc with MicroPython in flash."""
    emu = start_emulator(tmp_path)
    yield emu.boards[0]
    emu.stop()


@pytest.fixture(scope="module")
def shared_board(tmp_path_factory):
    """One board shared by a module's tests that leave it as they found it."""
    emu = start_emulator(tmp_path_factory.mktemp("emu"))
    yield emu.boards[0]
    emu.stop()

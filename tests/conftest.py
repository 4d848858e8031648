"""Shared fixtures: real Mosquitto brokers (tests/brokers.py)."""

from __future__ import annotations

import pytest

from tests.brokers import Mosquitto


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

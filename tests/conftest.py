"""Shared fixtures: emulated boards (tests/emu.py)."""

pytest_plugins = ["tests.emu"]

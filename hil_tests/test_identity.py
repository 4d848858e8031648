"""Who the node is: the firmware it boots, the MAC it is known by, the key it signs with."""

from __future__ import annotations

import re
from pathlib import Path

from citynode import wire
from hil_tests.bench import Bench

_VERSION_PY = (Path(__file__).parents[1] / "firmware" / "node" / "version.py").read_text()
FIRMWARE_VERSION = re.search(r'VERSION = "([^"]+)"', _VERSION_PY).group(1)
MIN_MICROPYTHON = tuple(map(int, re.search(r"MIN_MICROPYTHON = \(([^)]+)\)", _VERSION_PY)
                            .group(1).split(",")))


def test_boot_banner_names_the_device_and_the_firmware_version(bench: Bench):
    console = bench.boot_app()
    assert f"citynode: node {bench.device}, firmware {FIRMWARE_VERSION}, starting" in console


def test_the_board_mac_is_the_provisioned_device_id(bench: Bench):
    mac = bench.exec("import machine; print(machine.unique_id().hex())").strip()
    assert bench.device == f"cn-{mac}"
    assert bench.config()["device"] == bench.device
    if bench.emulated is not None:      # and the MAC the ROM (esptool) reports
        assert bench.emulated.mac == mac


def test_selftest_envelope_verifies_with_the_registry_key(bench: Bench):
    report = bench.selftest()
    body = bench.open(bytes.fromhex(report["envelope"]))    # raises if it does not verify
    assert (body.device, body.kind) == (bench.device, wire.KIND_SELFTEST)
    assert report["firmware"] == FIRMWARE_VERSION
    assert tuple(map(int, report["micropython"].split("."))) >= MIN_MICROPYTHON

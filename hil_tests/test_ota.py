"""A signed update rolled out by `citynode-ops ota` through the real gateway (its own
quota for update chunks) to a node, which checks it, receives it in its other slot,
resets into a trial boot and, when that boot cannot start the app, goes back to the
app it ran before by itself (docs/ota.md).

The node is an emulated WROVER kit of its own (module-scoped, already running
MicroPython: provisioning keeps it): a stock image, its app as .mpy files in a PSRAM
heap, where an update's .mpy files fit too. The session's devkitc does not: its ROMFS
app leaves no heap for a 2 KB downlink beside an update's code (issue 11). The bundles
are the firmware with another version, compiled for the emulated board's VM (`--arch
x64`). A trial boot that commits (after 120 s healthy) is tested on the unix port
(tests/test_firmware_ota.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from citynode import wire
from citynode.ops.bundle import split
from citynode.testing.emulator import FIRMWARE, wait_for
from hil_tests.bench import VENV_BIN, Bench, records
from hil_tests.conftest import emulated_pole
from hil_tests.test_ops import ops

ANSWER_S = 40
BOARD = "esp32-wrover-kit"


@pytest.fixture(scope="module")
def pole(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    if request.config.getoption("--port"):
        pytest.skip("updates on a real board: build a bundle for its chip and run "
                    "citynode-ops ota by hand (docs/ota.md)")
    with emulated_pole(tmp_path_factory.mktemp("hil-ota"), BOARD, blank=False) as bench:
        yield bench


@pytest.fixture
def node(pole: Bench) -> Bench:
    pole.boot_app()
    return pole


def _bundle(node: Bench, tmp: Path, version: str, broken: bool = False) -> Path:
    """The firmware as `version`, bundled with the bench's operator key; `broken`: a bad
    build that holds the app and its version but none of the modules they import (its
    trial boot cannot import the app), which also keeps it small and quick to send."""
    fw = tmp / "fw"
    shutil.copytree(FIRMWARE, fw, ignore=shutil.ignore_patterns("__pycache__"))
    version_py = fw / "node" / "version.py"
    version_py.write_text(version_py.read_text().replace('"0.1.0"', f'"{version}"'))
    if broken:
        shutil.rmtree(fw / "drivers")
        keep = {"__init__.py", "app.py", "version.py"}
        for module in (fw / "node").iterdir():
            if module.name not in keep:
                module.unlink()
    out = tmp / f"citynode-{version}.cbor"
    run = subprocess.run([str(VENV_BIN / "citynode-ops"), "--home", str(node.ops_home),
                          "bundle", "--board", BOARD, "--arch", "x64",
                          "--firmware", str(fw), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return out


def test_an_update_whose_app_cannot_start_is_left_by_the_node_itself(node: Bench, tmp_path):
    bundle = _bundle(node, tmp_path, "9.0.0", broken=True)
    code, result = ops(node, "ota", "--bundle", str(bundle), "--device", node.device,
                       "--wait", str(ANSWER_S), "--trial-wait", "120", timeout=600)
    [update] = result["nodes"]
    assert code == 1 and update["state"] == "reverted", update
    assert update["detail"] == "9.0.0 failed its trial boot"
    # it runs the app it ran before, and goes on with its readings
    with node.listen() as sub:
        sub.wait(2, timeout=3 * node.window_s + 30, kind=wire.KIND_READINGS)
    assert set(_versions(sub)) == {"0.1.0"}


def test_a_bundle_the_node_runs_already_is_refused_before_any_chunk(node: Bench, tmp_path):
    bundle = _bundle(node, tmp_path, "0.1.0")
    code, result = ops(node, "ota", "--bundle", str(bundle), "--device", node.device,
                       "--wait", str(ANSWER_S), timeout=300)
    [update] = result["nodes"]
    assert code == 1 and update["state"] == "failed" and update["offset"] == 0, update
    assert "not_newer" in update["detail"], update


def test_a_good_update_runs_on_its_trial_boot(node: Bench, tmp_path):
    """The update itself, from its slot, on the board: its windows carry its version.
    (Its commit comes after 120 s healthy: not waited for here.)"""
    bundle = _bundle(node, tmp_path, "9.1.0")
    code, result = ops(node, "ota", "--bundle", str(bundle), "--device", node.device,
                       "--wait", str(ANSWER_S), "--trial-wait", "1", timeout=600)
    [update] = result["nodes"]
    _, blob = split(bundle.read_bytes())
    assert update["offset"] == len(blob) and update["state"] == "failed", update
    assert "no word from its trial boot" in update["detail"]
    with node.listen() as sub:      # the app before may send a last window as it resets
        wait_for(lambda: "9.1.0" in _versions(sub), timeout=3 * node.window_s + 30,
                 what="a window of the trial boot")


def _versions(sub) -> list[str]:
    return [records(w).get("node/firmware") for w in sub.bodies(wire.KIND_READINGS)]

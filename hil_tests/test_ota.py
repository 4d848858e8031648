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

import json
import shutil
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from citynode import wire
from citynode.ops.bundle import split
from citynode.ops.ota import CHUNK_BYTES
from citynode.registry import load_record, write_record
from citynode.testing.emulator import FIRMWARE, wait_for
from hil_tests.bench import VENV_BIN, Bench, records
from hil_tests.conftest import emulated_pole
from hil_tests.test_ops import ops

MANIFEST = "manifest.cose"      # the slot's signed manifest (firmware/node/ota.py)
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


def _bundle(node: Bench, tmp: Path, version: str, broken: bool = False,
            blind: bool = False) -> Path:
    """The firmware as `version`, bundled with the bench's operator key; `broken`: a bad
    build that holds the app and its version but none of the modules they import (its
    trial boot cannot import the app), which also keeps it small and quick to send;
    `blind`: a build whose light sensor never reads (its self-test fails)."""
    fw = tmp / "fw"
    shutil.copytree(FIRMWARE, fw, ignore=shutil.ignore_patterns("__pycache__"))
    version_py = fw / "node" / "version.py"
    version_py.write_text(version_py.read_text().replace('"0.1.0"', f'"{version}"'))
    if blind:
        sensors_py = fw / "node" / "sensors.py"
        text = sensors_py.read_text()
        assert "return (await self.part.alux(),)" in text
        sensors_py.write_text(text.replace("return (await self.part.alux(),)",
                                           "raise OSError('this build cannot read it')"))
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
    code, update = _roll(node, bundle, "--trial-wait", "120", timeout=600)
    assert code == 1 and update["state"] == "reverted", update
    assert update["detail"].startswith("9.0.0 failed its trial boot: its app cannot start: "
                                       "ImportError"), update
    _runs_the_app_before(node)


def test_a_bundle_the_node_runs_already_is_refused_before_any_chunk(node: Bench, tmp_path):
    bundle = _bundle(node, tmp_path, "0.1.0")
    code, update = _roll(node, bundle, timeout=300)
    assert code == 1 and update["state"] == "failed" and update["offset"] == 0, update
    assert "not_newer" in update["detail"], update


def test_a_good_update_runs_on_its_trial_boot(node: Bench, tmp_path):
    """The update itself, from its slot, on the board: its windows carry its version.
    (Its commit comes after 120 s healthy: not waited for here.)"""
    bundle = _bundle(node, tmp_path, "9.1.0")
    _, update = _roll(node, bundle, "--trial-wait", "1", timeout=600)
    _, blob = split(bundle.read_bytes())
    assert update["offset"] == len(blob) and update["state"] == "failed", update
    assert "no word from its trial boot" in update["detail"]
    with node.listen() as sub:      # the app before may send a last window as it resets
        wait_for(lambda: "9.1.0" in _versions(sub), timeout=3 * node.window_s + 30,
                 what="a window of the trial boot")


@contextmanager
def _second_node(node: Bench) -> Iterator[str]:
    """Another node on the pole, as the operator sees it: the node's registry record
    under another id (it never answers; a rollout that reaches it fails on it), announced
    by the gateway after its reload (SIGHUP), gone again afterwards."""
    assert node.gateway is not None
    registry = Path(tomllib.loads(node.gateway.config.read_text())["gateway"]["registry_dir"])
    record = load_record(registry / f"{node.device}.json")
    second = "cn-" + format(int(node.device[3:], 16) ^ 1, "012x")
    path = write_record(registry, replace(record, device_id=second))
    try:
        node.gateway.signal(signal.SIGHUP)
        wait_for(lambda: second in [n["device"] for n in ops(node, "fleet")[1]["nodes"]],
                 timeout=30, what=f"{second} announced by the gateway")
        yield second
    finally:
        path.unlink()
        node.gateway.signal(signal.SIGHUP)
        wait_for(lambda: second not in [n["device"] for n in ops(node, "fleet")[1]["nodes"]],
                 timeout=30, what=f"{second} no longer announced")


def _roll(node: Bench, bundle: Path, *args: str, timeout: float) -> tuple[int, dict]:
    """`citynode-ops ota` of `bundle` to the node: (exit code, the node's result)."""
    code, result = ops(node, "ota", "--bundle", str(bundle), "--device", node.device,
                       "--wait", str(ANSWER_S), *args, timeout=timeout)
    [update] = result["nodes"]
    return code, update


def _runs_the_app_before(node: Bench) -> None:
    """The node goes on with its readings, from the app it ran before the update."""
    with node.listen() as sub:
        sub.wait(2, timeout=3 * node.window_s + 30, kind=wire.KIND_READINGS)
    assert set(_versions(sub)) == {"0.1.0"}


def _versions(sub) -> list[str]:
    return [records(w).get("node/firmware") for w in sub.bodies(wire.KIND_READINGS)]


def test_a_build_whose_self_test_fails_is_left_at_its_first_window(node: Bench, tmp_path):
    """...and, the node being the rollout's canary, no other node is sent a byte of it."""
    bundle = _bundle(node, tmp_path, "9.3.0", blind=True)
    with _second_node(node) as second:
        code, result = ops(node, "ota", "--bundle", str(bundle), "--device", node.device,
                           "--device", second, "--canary", "1", "--wait", str(ANSWER_S),
                           "--trial-wait", "120", timeout=600)
    update, behind = result["nodes"]
    assert code == 1 and update["state"] == "reverted", update
    assert update["detail"] == "9.3.0 failed its trial boot: self-test: light failed", update
    assert behind["device"] == second and behind["state"] == "skipped", behind
    assert behind["sent"] == 0 and behind["detail"] == "a canary did not commit", behind
    _runs_the_app_before(node)
    # the same build again: refused before any chunk, with the reason
    code, update = _roll(node, bundle, timeout=300)
    assert code == 1 and update["state"] == "reverted" and update["sent"] == 0, update
    assert "failed_trial" in update["detail"] and "light failed" in update["detail"], update


def test_an_update_goes_on_through_power_cuts_and_a_gateway_restart(node: Bench, tmp_path):
    """One rollout, every break on its way: the power cut in the download (the node
    forgets the update; the rollout begins it again from what the slot holds), the
    gateway restarted in the download (its chunks in flight are lost), the power cut
    between the check and the trial boot, and the power cut in the trial boot (before
    its commit: the node goes back by itself, and says so)."""
    if node.gateway is None:
        pytest.skip("restarts the bench's own gateway: emulated pole only")
    bundle = _bundle(node, tmp_path, "9.2.0")
    signed, blob = split(bundle.read_bytes())
    fs = node.require_emulator("power cuts").state / "fs"
    slot = fs / "app_a"             # the node runs the provisioned app: the slot is A
    run = subprocess.Popen([str(VENV_BIN / "citynode-ops"), "--home", str(node.ops_home),
                            "ota", "--bundle", str(bundle), "--device", node.device,
                            "--wait", "8", "--trial-wait", "120", "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _held(slot, signed) > len(blob) // 3, timeout=120,
                 what="a third of the bundle in the slot")
        cut_at = _held(slot, signed)
        _power_cut(node)
        wait_for(lambda: _held(slot, signed) > cut_at + 4 * CHUNK_BYTES, timeout=120,
                 what="the download going on after the power cut")
        node.gateway.kill()
        node.gateway.start()
        wait_for(lambda: _state(fs).get("state") == "trial", timeout=180,
                 what="the update checked and set to be tried")
        _power_cut(node)            # before, or as, it resets into the trial boot
        wait_for(lambda: _state(fs).get("boots") == 1, timeout=30, what="the trial boot")
        _power_cut(node)
        out, err = run.communicate(timeout=300)
    except AssertionError as exc:
        run.kill()
        raise AssertionError(f"{exc}; citynode-ops said:\n{run.communicate()[1]}") from exc
    finally:
        run.kill()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, err
    [update] = json.loads(lines[-1])["result"]["nodes"]
    assert run.returncode == 1 and update["state"] == "reverted", (update, err)
    assert "9.2.0 failed its trial boot" in update["detail"], update
    assert "ended in a power cut" in update["detail"], update
    assert "resuming" in err
    # resumed where the flash stopped, not started over
    assert update["offset"] == len(blob) and update["sent"] < len(blob) + cut_at, update
    _runs_the_app_before(node)


def _held(slot: Path, signed: bytes) -> int:
    """The bundle's bytes in the slot (its files on the emulated board's flash), once the
    slot is this bundle's (an earlier test's update may be there before)."""
    try:
        if (slot / MANIFEST).read_bytes() != signed:
            return 0
        return sum(f.stat().st_size for f in slot.rglob("*")
                   if f.is_file() and f.name != MANIFEST)
    except OSError:
        return 0


def _state(fs: Path) -> dict:
    try:
        return json.loads((fs / "data" / "ota.json").read_text())
    except (OSError, ValueError):
        return {}


def _power_cut(node: Bench) -> None:
    node.fault("power", on=False)
    time.sleep(0.5)
    node.fault("power", on=True)

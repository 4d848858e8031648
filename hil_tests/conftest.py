"""One node for the whole session, provisioned through the real `citynode-provision`
path: a blank emulated board by default, or the board on `--port`.

    pytest hil_tests                                  # emulated boards, started here
    pytest hil_tests --port /dev/ttyUSB0 --board esp32-devkitc \\
        --broker 192.168.4.1:1883 --wifi-ssid pole-lab --wifi-password-file ~/wifi.pw

For a real board the suite starts a Mosquitto on all interfaces and gives the node
this PC's address (or uses `--broker`); the bench's Wi-Fi comes from --wifi-ssid /
--wifi-password-file or $CITYNODE_WIFI_SSID / $CITYNODE_WIFI_PASSWORD_FILE. Tests
that need a fault only the emulator makes skip on hardware and say why (`-ra`).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from citynode.chrony import PoleTimeServer
from citynode.mosquitto import Mosquitto
from citynode.registry import load_registry
from citynode.testing.emulator import start_emulator
from citynode.testing.gateway import GatewayProcess
from citynode.testing.provisioning import cli, make_image, ops_init, password_file
from hil_tests.bench import Bench

WINDOW_S = 5


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hil", "hardware-in-the-loop suite (hil_tests/)")
    group.addoption("--board-kind", choices=("emu", "serial"), default=None,
                    help="emu (default): start an emulated board; serial: the board on --port")
    group.addoption("--port", help="a real board's serial port, e.g. /dev/ttyUSB0")
    group.addoption("--board", default="esp32-devkitc", help="board name from boards.yaml")
    group.addoption("--broker", help="HOST:PORT of a Mosquitto the real board can reach "
                    "(default: one started here, on all interfaces)")
    group.addoption("--wifi-ssid", default=os.environ.get("CITYNODE_WIFI_SSID"),
                    help="the bench's Wi-Fi (real board; default $CITYNODE_WIFI_SSID)")
    group.addoption("--wifi-password-file", default=os.environ.get("CITYNODE_WIFI_PASSWORD_FILE"),
                    help="its password, in a file (default $CITYNODE_WIFI_PASSWORD_FILE)")
    group.addoption("--ntp", help="HOST:PORT of the time server a real board syncs from "
                    "(default: the broker's host, port 123: chrony on this PC)")
    group.addoption("--image", help="MicroPython image to flash (default: the firmware cache)")
    group.addoption("--no-chip-speed", action="store_true",
                    help="skip the second emulated node that runs at the chip's speed")


@pytest.hookimpl(tryfirst=True)   # before xdist's own, which reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`make test` runs two pytest-xdist workers (--dist loadgroup): the HIL tests share
    one session-scoped bench, so one worker runs them all, one after another; the
    chip-speed and update modules have nodes of their own, so their tests are groups apart."""
    here = Path(__file__).parent
    own = {"test_chip_speed.py": "hil-chip", "test_ota.py": "hil-ota"}
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.xdist_group(own.get(item.path.name, "hil")))


def _hardware(config: pytest.Config) -> bool:
    kind = config.getoption("--board-kind") or ("serial" if config.getoption("--port") else "emu")
    if kind == "serial" and not (config.getoption("--port") and config.getoption("--wifi-ssid")
                                 and config.getoption("--wifi-password-file")):
        raise pytest.UsageError("a real board needs --port and the bench's Wi-Fi: --wifi-ssid "
                                "and --wifi-password-file (or CITYNODE_WIFI_SSID and "
                                "CITYNODE_WIFI_PASSWORD_FILE)")
    return kind == "serial"


def _lan_address() -> str:
    """This PC's address on the network the board joins (the default route's source)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))            # TEST-NET: nothing is sent
        return probe.getsockname()[0]


def _provision(tmp: Path, port: str, board: str, broker: str, ssid: str, pwfile: Path,
               image: Path | None, operator_pem: Path, ntp: str | None = None) -> str:
    args = ["provision", "--port", port, "--board", board, "--registry", str(tmp / "fleet"),
            "--site", "hil", "--pole", "HIL-1", "--broker", broker, "--wifi-ssid", ssid,
            "--wifi-password-file", str(pwfile), "--window-s", str(WINDOW_S),
            "--operator-key", str(operator_pem), "--json", *(["--ntp", ntp] if ntp else [])]
    run = cli(*args, *(["--image", str(image)] if image else []), logs=tmp / "logs")
    assert run.code == 0, f"provisioning failed ({run.code}):\n{run.stdout}\n{run.stderr}"
    return run.result["boards"][0]["device"]


@pytest.fixture(scope="session")
def bench(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    config = request.config
    tmp = tmp_path_factory.mktemp("hil")
    operator, operator_pem = ops_init(tmp)
    board = config.getoption("--board")
    image = config.getoption("--image")
    if _hardware(config):
        port, broker = config.getoption("--port"), config.getoption("--broker")
        with nullcontext() if broker else Mosquitto(tmp / "broker", bind="0.0.0.0") as mosquitto:
            if mosquitto is not None:
                broker = f"{_lan_address()}:{mosquitto.port}"
            device = _provision(tmp, port, board, broker, config.getoption("--wifi-ssid"),
                                Path(config.getoption("--wifi-password-file")),
                                Path(image) if image else None, operator_pem,
                                config.getoption("--ntp"))
            host, _, broker_port = broker.rpartition(":")
            yield _bench(tmp, device, port, (host, int(broker_port)), operator)
        return
    with emulated_pole(tmp, board, Path(image) if image else None) as pole:
        yield pole


@contextmanager
def emulated_pole(tmp: Path, board: str, image: Path | None = None,
                  blank: bool = True) -> Iterator[Bench]:
    """The pole as deployed, around one emulated `board`: the node's broker, and a
    gateway relaying to a city broker (where citynode-ops reaches the node, as an
    operator does). `blank`: the board is flashed first, as a new one from the box;
    else it already runs the board's MicroPython and provisioning keeps it."""
    with Mosquitto(tmp / "broker", persistence=True) as mosquitto, \
            Mosquitto(tmp / "city") as city, PoleTimeServer(tmp / "chrony") as clock:
        operator, operator_pem = ops_init(tmp, (city.host, city.port))
        scenario = tmp / "scenario.json"
        # a spring noon (daylight on the BH1750); impulses only when a test fires one
        scenario.write_text(json.dumps({"start": "2026-04-15T12:00:00", "events": []}))
        emu = start_emulator(tmp, board=board, blank=blank, extra=["--scenario", str(scenario)])
        if blank:
            image = image or make_image(tmp, board)
        gateway = GatewayProcess(tmp / "gateway", mosquitto, city, gateway_extra={
            "registry_dir": str(tmp / "fleet"), "operator_key": str(operator_pem),
            "id": "HIL-1"})
        try:
            handle = emu.boards[0]
            device = _provision(tmp, handle.url, board, f"{mosquitto.host}:{mosquitto.port}",
                                "city", password_file(tmp), image, operator_pem,
                                f"{clock.host}:{clock.port}")
            gateway.start()
            yield _bench(tmp, device, handle.link, (mosquitto.host, mosquitto.port), operator,
                         handle, ops_home=tmp / "ops", gateway=gateway)
        finally:
            gateway.kill()
            emu.stop()


@pytest.fixture(scope="module")
def chip_bench(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A second emulated node that runs at the chip's speed (issue 11): provisioned at
    host speed (as the bench's node), then its emulator restarted with --chip-speed on
    the same board state, so the firmware's compute takes the chip's time against the
    real-time microphone, UART and broker. Module-scoped: its throttle's wake-ups cost
    CPU, so it is gone before the rest of the suite runs."""
    config = request.config
    if _hardware(config):
        pytest.skip("chip speed is for emulated boards: a real board has its own")
    if config.getoption("--no-chip-speed"):
        pytest.skip("--no-chip-speed")
    tmp = tmp_path_factory.mktemp("hil-chip")
    operator, operator_pem = ops_init(tmp)
    board = config.getoption("--board")
    with Mosquitto(tmp / "broker", persistence=True) as mosquitto, \
            PoleTimeServer(tmp / "chrony") as clock:
        scenario = tmp / "scenario.json"
        scenario.write_text(json.dumps({"start": "2026-04-15T12:00:00", "events": []}))
        extra = ["--scenario", str(scenario)]
        emu = start_emulator(tmp, board=board, blank=True, extra=extra)
        try:
            device = _provision(tmp, emu.boards[0].url, board,
                                f"{mosquitto.host}:{mosquitto.port}", "city", password_file(tmp),
                                make_image(tmp, board), operator_pem, f"{clock.host}:{clock.port}")
        finally:
            emu.stop()
        emu = start_emulator(tmp, board=board, extra=extra, chip_speed=True, timeout=120)
        try:
            handle = emu.boards[0]
            yield _bench(tmp, device, handle.link, (mosquitto.host, mosquitto.port), operator,
                         handle)
        finally:
            emu.stop()


def _bench(tmp: Path, device: str, port: str, broker: tuple[str, int],
           operator: ec.EllipticCurvePrivateKey, emulated=None,
           ops_home: Path | None = None, gateway: GatewayProcess | None = None) -> Bench:
    registry = load_registry(tmp / "fleet", strict=True)
    record = registry.get(device)
    assert record is not None and record.active, f"{device} is not in the registry"
    return Bench(port=port, device=device, public_key=registry.credential(record).public_key,
                 operator=operator, broker=broker, window_s=WINDOW_S, emulated=emulated,
                 ops_home=ops_home, gateway=gateway)


@pytest.fixture
def node(bench: Bench) -> Bench:
    """The node with its app running, whatever the previous test left."""
    bench.boot_app()
    return bench


@pytest.fixture
def chip_node(chip_bench: Bench) -> Bench:
    """The chip-speed node with its app running (its boot takes the chip's time)."""
    chip_bench.boot_app(timeout=120)
    return chip_bench

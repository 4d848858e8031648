"""One home per concept in the emulator: the parts registry, generic wiring, the accept loop,
the acoustic conventions.

Host-only and fast: Peripherals on a manual clock, as in test_emu_devices.py.
"""

from __future__ import annotations

import ast
import dataclasses
import socket
import struct
import threading
import time

import numpy as np
import pytest

from citynode import acoustics
from citynode.boards import get_board
from citynode.emulator.devices import DEVICES, SimulatedPart
from citynode.emulator.devices import mic as mic_mod
from citynode.emulator.peripherals import Peripherals
from citynode.emulator.radio import Radio
from citynode.emulator.scenario import ManualClock, Scenario
from citynode.emulator.sockets import Listener
from citynode.parts import PARTS
from citynode.testing.micropython import FIRMWARE


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def test_the_registry_names_the_parts_of_the_sensor_table() -> None:
    assert list(DEVICES) == list(PARTS)  # same names, same order (the parts' noise seeds)
    for name, cls in DEVICES.items():
        assert issubclass(cls, SimulatedPart) and cls.name == name
        assert PARTS[name].bus in ("i2c", "uart", "i2s")


def test_every_catalogue_board_gets_its_parts_where_it_wires_them(clock) -> None:
    for board_name in ("esp32-devkitc", "esp32-wrover-kit", "esp32-s3-devkitc",
                       "esp32-c3-devkitm"):
        board = get_board(board_name)
        p = Peripherals(board, Scenario(clock=clock))
        try:
            assert list(p.parts) == list(board.sensors)
            for name, part in p.parts.items():
                assert part.bus == PARTS[name].bus == board.sensors[name]["bus"]
            assert p.i2c_scan(0) == sorted(s["address"] for s in board.sensors.values()
                                           if s["bus"] == "i2c")
            assert set(p.uart_wires) == {s["uart"] for s in board.sensors.values()
                                         if s["bus"] == "uart"}
        finally:
            p.close()


def test_the_pms5003_speaks_on_the_uart_its_board_names(clock) -> None:
    s = Scenario(clock=clock)
    s.override(pm25=33.0)
    p = Peripherals(get_board("esp32-s3-devkitc"), s)     # PMS5003 on UART 1, BME280 at 0x77
    p.uart_init(1, 9600, 256)
    p.uart_init(2, 9600, 256)
    clock.advance(2.1)
    frame = p.uart_read(1, 32, 0)[1]
    assert frame[:2] == b"\x42\x4d" and struct.unpack(">H", frame[12:14])[0] == 33
    assert p.uart_read(2, 32, 0) == (0, b"")
    p.i2c_write(0, 0x77, b"\xd0")
    assert p.i2c_read(0, 0x77, 1) == b"\x60"
    p.close()


def test_a_board_without_a_part_has_no_trace_of_it(clock) -> None:
    board = get_board("esp32-devkitc")
    board = dataclasses.replace(board, sensors={"bh1750": board.sensors["bh1750"]})
    p = Peripherals(board, Scenario(clock=clock))
    assert list(p.parts) == ["bh1750"] and p.i2c_scan(0) == [0x23]
    assert "pms5003" not in p.state()
    p.uart_init(2, 9600, 256)
    clock.advance(3.0)
    assert p.uart_read(2, 32, 0) == (0, b"")        # nothing on the line
    p.pin_write(27, 0)                               # pms_set: drives nothing
    with pytest.raises(ValueError, match="one of bh1750$"):
        p.fault("unplug", sensor="pms5003")
    with pytest.raises(ValueError, match="must be bh1750$"):
        p.fault("corrupt", sensor="mic")


def test_the_status_has_the_same_keys_as_before(clock) -> None:
    p = Peripherals(get_board("esp32-devkitc"), Scenario(clock=clock))
    assert list(p.state()) == ["lamp", "lamp_pwm", "pwm", "pins", "unplugged", "stuck",
                               "i2s_overruns",
                               "i2s_dropped_bytes", "uart_dropped", "pms5003", "scenario"]
    assert p.state()["pms5003"] == {"active": True, "asleep": False, "warming_up": False}
    with pytest.raises(ValueError, match="must be bh1750, bme280 or pms5003$"):
        p.fault("corrupt", sensor="mic")


def test_each_part_keeps_its_own_noise_seed(clock) -> None:
    """The seeds the parts had when Peripherals built them by name: board seed + 1..4."""
    s = Scenario(seed=5, clock=clock, events=[])
    p = Peripherals(get_board("esp32-devkitc"), s, seed=3)
    board_seed = p._seed
    assert p.parts["mic"].seed == board_seed + 4
    expected = mic_mod.Microphone(s, 16000, seed=board_seed + 4).block(256)
    assert np.array_equal(p.microphone(16000).block(256), expected)


def test_the_mic_and_the_reference_share_one_a_weighting() -> None:
    assert mic_mod.a_weighting is acoustics.a_weighting
    assert mic_mod.FULL_SCALE == acoustics.FULL_SCALE == 1 << 23
    assert acoustics.FULL_SCALE_SPL == 120.0
    assert abs(float(acoustics.a_weighting_db(1000.0))) < 0.001
    assert float(acoustics.a_weighting_db(100.0)) == pytest.approx(-19.1, abs=0.05)


def _constants(path, names: tuple[str, ...]) -> dict[str, object]:
    """Module-level NAME = <literal or simple expression> values of a firmware file."""
    tree = ast.parse(path.read_text())
    found: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id in names:
                found[target.id] = eval(compile(ast.Expression(node.value), str(path), "eval"),
                                        dict(found))
    return found


def test_the_firmware_copy_of_the_acoustic_constants_is_in_step() -> None:
    """The node's MicroPython keeps its own copy (it cannot import citynode.acoustics)."""
    meter = _constants(FIRMWARE / "node" / "acoustic.py", ("F1", "F2", "F3", "F4"))
    assert tuple(meter[k] for k in ("F1", "F2", "F3", "F4")) == acoustics.A_WEIGHTING_POLES_HZ
    mic = _constants(FIRMWARE / "drivers" / "mic.py",
                     ("FULL_SCALE", "SENSITIVITY_DBFS", "FS_DB_SPL"))
    assert mic == {"FULL_SCALE": acoustics.FULL_SCALE,
                   "SENSITIVITY_DBFS": acoustics.SENSITIVITY_DBFS,
                   "FS_DB_SPL": acoustics.FULL_SCALE_SPL}


def test_a_listener_serves_connections_and_stops_when_closed() -> None:
    listener = Listener(poll_s=0.05)
    got: list[bytes] = []

    def handle(conn: socket.socket) -> None:
        with conn:
            got.append(conn.recv(16))

    thread = listener.serve(handle, name="test")
    for payload in (b"one", b"two"):
        with socket.create_connection(("127.0.0.1", listener.port)) as c:
            c.sendall(payload)
    deadline = time.monotonic() + 2
    while len(got) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(got) == [b"one", b"two"]
    listener.close()
    thread.join(timeout=1)
    assert not thread.is_alive()


def test_a_listener_accept_returns_none_once_closed() -> None:
    listener = Listener(poll_s=0.05)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(listener.accept()))
    t.start()
    time.sleep(0.1)
    listener.close()
    t.join(timeout=1)
    assert result == [None]


def test_the_radio_passes_a_close_on_as_a_close_after_the_data() -> None:
    # A node that writes DISCONNECT and closes: the broker must read the packet, then an
    # orderly end. A reset after it made Mosquitto drop the connection unread (EPOLLHUP)
    # and publish the node's last will although it had said goodbye.
    far = socket.create_server(("127.0.0.1", 0))
    radio = Radio()                   # any SSID and password are accepted
    radio.set_active(True)
    radio.connect("pole", "secret")
    deadline = time.monotonic() + 5
    while not radio.connected() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        port = radio.resolve("127.0.0.1", far.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port)) as node:
            server, _ = far.accept()
            node.sendall(b"\xe0\x00")
        time.sleep(0.3)               # the broker is slow to look: both have arrived by now
        with server:
            assert server.recv(16) == b"\xe0\x00"
            assert server.recv(16) == b""          # an end, not ConnectionResetError
    finally:
        radio.close()
        far.close()

"""Fault injection and inspection: a JSON-lines Unix socket per board (state/control.sock).

Tests and `citynode-emu ctl` use it to do to a board what happens on a pole:
Wi-Fi loss, a sensor unplugged, corrupted frames, a part holding the I2C bus low, a
power cut, a hung part, and the two buttons (EN, BOOT).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .board import PWRON_RESET, EmulatedBoard
from .sockets import Listener

log = logging.getLogger(__name__)
SOCKET_NAME = "control.sock"


class ControlError(RuntimeError):
    pass


def _status(board: EmulatedBoard) -> dict[str, Any]:
    status = {"board": board.board.name, "mac": board.mac_text, "mode": board.mode,
              "reset_cause": board.reset_cause, "boots": board.boots,
              "uptime_ms": board.uptime_ms, "running_code": board.running_code,
              "wifi": {"ap_up": board.radio.ap_up, "status": board.radio.status()},
              "link": str(board.pty.path) if board.pty else None,
              "rfc2217": board.rfc2217.url if board.rfc2217 else None}
    if board.peripherals is not None:
        status["peripherals"] = board.peripherals.state()
    collections = board.collections()
    if collections is not None:
        status["collections"] = collections
    hitches = board.hitches()
    if hitches is not None:
        status["hitches"] = hitches
    return status


def _power(board: EmulatedBoard, on: bool = True) -> None:
    if on:
        board.power_on()
    else:
        board.power_cut()


def _press(board: EmulatedBoard, button: str = "en") -> None:
    """EN alone resets; BOOT held while EN is pressed enters download mode."""
    board.reset(PWRON_RESET, download=button == "boot")


def _fault(board: EmulatedBoard, name: str, **kw: Any) -> None:
    if board.peripherals is None:
        raise ControlError("this board has no simulated parts attached")
    board.peripherals.fault(name, **kw)


def _scenario(board: EmulatedBoard):
    if board.peripherals is None:
        raise ControlError("this board has no simulated parts attached")
    return board.peripherals.scenario


def _impulse(scenario, kind: str, level_db: float, after_s: float) -> dict:
    """A sound event `after_s` from now; with `unix`, the host's time of its onset."""
    event = scenario.add_event(kind, level_db, after_s)
    return {**asdict(event), "unix": scenario.unix_at(event.time)}


COMMANDS = {
    "status": lambda b: _status(b),
    "wifi": lambda b, up: b.radio.set_ap(bool(up)),
    "rssi": lambda b, dbm: setattr(b.radio, "rssi", int(dbm)),
    "link": lambda b, **settings: b.radio.set_link(**settings),
    "power": _power,
    "press": _press,
    "hang": lambda b: b.hang(),
    "unplug": lambda b, sensor: _fault(b, "unplug", sensor=sensor),
    "plug": lambda b, sensor: _fault(b, "plug", sensor=sensor),
    "corrupt": lambda b, sensor, count=1, kind="checksum": _fault(b, "corrupt", sensor=sensor,
                                                               count=count, kind=kind),
    "stuck": lambda b, sensor: _fault(b, "stuck", sensor=sensor),
    "unstuck": lambda b, sensor: _fault(b, "unstuck", sensor=sensor),
    "pin": lambda b, **values: _scenario(b).override(**values),
    "impulse": lambda b, kind="gunshot", level_db=120.0, after_s=0.5: _impulse(
        _scenario(b), kind, float(level_db), float(after_s)),
}


@contextmanager
def _unix_path(path: Path) -> Iterator[str]:
    """`path` for bind/connect: AF_UNIX takes at most 107 bytes, so a longer one (a deep
    --state folder) is reached through its folder's descriptor (Linux /proc/self/fd)."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class ControlServer:
    def __init__(self, board: EmulatedBoard):
        self.board = board
        self.path = board.state / SOCKET_NAME
        if self.path.exists():
            self.path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with _unix_path(self.path) as where:
            server.bind(where)
        os.chmod(self.path, 0o600)
        server.listen()
        self._listener = Listener(server)
        self._listener.serve(self._serve, name="control")

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            for line in stream:
                stream.write(json.dumps(self._handle(line)).encode() + b"\n")
                stream.flush()

    def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            command = COMMANDS[request.pop("cmd")]
            return {"ok": True, "result": command(self.board, **request)}
        except KeyError as exc:
            return {"ok": False, "error": f"unknown command or argument {exc}"}
        except Exception as exc:  # the reply is the error report
            return {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"}

    def close(self) -> None:
        self._listener.close()
        if self.path.exists():
            self.path.unlink()


def control(state: Path, cmd: str, **args: Any) -> Any:
    """Send one command to the board whose state dir is `state`; returns its result."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _unix_path(Path(state) / SOCKET_NAME) as where:
            sock.connect(where)
    except OSError as exc:
        raise ControlError(f"no emulated board is running with state {state}: {exc}") from None
    with sock, sock.makefile("rwb") as stream:
        stream.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        stream.flush()
        reply = json.loads(stream.readline())
    if not reply["ok"]:
        raise ControlError(reply["error"])
    return reply["result"]

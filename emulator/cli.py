"""citynode-emu: emulated ESP32 boards behind real serial links.

    citynode-emu run --board esp32-devkitc --link /tmp/cn/node0 --rfc2217 4020 --state /tmp/cn/state
    citynode-emu image --board esp32-devkitc -o micropython.bin
    citynode-emu ctl /tmp/cn/state/node0 wifi up=false
    citynode-emu run ... --chip-speed     # the firmware at the chip's speed (issue 11)
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from citynode import cli, speed
from citynode.boards import BoardCatalogueError, get_board

from .board import EmulatedBoard
from .control import ControlError, ControlServer, control
from .image import build_image
from .peripherals import Peripherals
from .radio import Radio
from .scenario import Scenario
from .vm import MicroPythonNotFound, micropython_binary

log = logging.getLogger("citynode-emu")


def _link_names(link: Path, count: int) -> list[Path]:
    if count == 1:
        return [link]
    stem = re.sub(r"\d+$", "", link.name)
    return [link.with_name(f"{stem}{i}") for i in range(count)]


def _read_secret(path: str | None) -> str | None:
    if path is None:
        return None
    return Path(path).read_text().strip()


def _speed_factor(args: argparse.Namespace, board) -> float | None:
    """--speed-factor as given, or --chip-speed's: this host measured against the
    board's published figures (citynode/speed.py, interpreted code)."""
    if args.speed_factor is not None:
        if args.speed_factor < 1:
            raise ValueError(f"--speed-factor {args.speed_factor}: must be >= 1")
        return args.speed_factor
    if not args.chip_speed:
        return None
    try:
        factor = speed.factors(board).interp
    except speed.CalibrationError as exc:
        raise ValueError(str(exc)) from None
    log.info("%s at chip speed: host x %.1f (interpreted code)", board.name, factor)
    return max(1.0, factor)


def _places(scenario_doc: dict, boards: int) -> list[list[float]]:
    """Where each board stands (the scenario's "positions", metres on the street plan,
    one [x, y] per board in --count order); all at the origin if it has none."""
    places = scenario_doc.pop("positions", None)
    if places is None:
        return [[0.0, 0.0]] * boards
    if (not isinstance(places, list) or len(places) != boards
            or not all(isinstance(p, list) and len(p) == 2 for p in places)):
        raise ValueError(f"scenario \"positions\": one [x, y] in metres per board ({boards})")
    return places


def cmd_run(args: argparse.Namespace) -> int:
    board = get_board(args.board)
    if args.heap_kb is not None:  # what the firmware would need: not the board's truth
        board = replace(board, heap_kb=args.heap_kb)
    micropython_binary()  # fail now, with the fix, rather than at first boot
    factor = _speed_factor(args, board)
    links = _link_names(Path(args.link), args.count)
    boards: list[EmulatedBoard] = []
    controls: list[ControlServer] = []
    password = _read_secret(args.wifi_password_file)
    scenario_doc = json.loads(Path(args.scenario).read_text()) if args.scenario else {}
    if args.time_scale is not None:
        scenario_doc["time_scale"] = args.time_scale
    places = _places(scenario_doc, len(links))
    try:
        for i, link in enumerate(links):
            # one world for all boards of a run, each board at its place in it; each
            # board's parts have their own noise
            scenario = Scenario.from_dict({**scenario_doc, "position": places[i]})
            emu = EmulatedBoard(board, Path(args.state) / link.name, link=link,
                                rfc2217_port=args.rfc2217 + i, blank=args.blank,
                                radio=Radio(args.wifi_ssid, password),
                                peripherals=Peripherals(board, scenario, seed=i))
            emu.speed_factor = factor  # read at each VM start (board.py _start_vm)
            boards.append(emu)
            controls.append(ControlServer(emu))
            emu.power_on()
            print(json.dumps({"board": board.name, "mac": emu.mac_text, "link": str(link),
                              "rfc2217": emu.rfc2217.url if emu.rfc2217 else None,
                              "state": str(emu.state), "speed_factor": factor}), flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        for c in controls:
            c.close()
        for emu in boards:
            emu.close()
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    board = get_board(args.board)
    data = build_image(board)
    Path(args.output).write_bytes(data)
    print(f"{args.output}: MicroPython stand-in image for {board.name} ({board.chip}), "
          f"{len(data)} bytes, write it at {board.firmware_offset:#x}")
    return 0


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_ctl(args: argparse.Namespace) -> int:
    kwargs = {}
    for item in args.args:
        key, sep, value = item.partition("=")
        if not sep:
            raise ControlError(f"argument {item!r} must be key=value, e.g. up=false")
        kwargs[key] = _parse_value(value)
    result = control(Path(args.state), args.command, **kwargs)
    if result is not None:
        print(json.dumps(result, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="citynode-emu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run emulated boards until SIGINT/SIGTERM")
    run.add_argument("--board", default="esp32-devkitc", help="a board from boards.yaml")
    run.add_argument("--link", required=True, help="pty symlink path, e.g. /tmp/cn/node0")
    run.add_argument("--rfc2217", type=int, default=4020, help="first RFC 2217 TCP port")
    run.add_argument("--state", required=True, help="state dir (flash, filesystem, MAC)")
    run.add_argument("--count", type=int, default=1, help="number of boards")
    run.add_argument("--blank", action="store_true", help="new boards start with erased flash")
    run.add_argument("--wifi-ssid", help="the access point's SSID (default: accept any)")
    run.add_argument("--wifi-password-file", help="file holding the access point's password")
    run.add_argument("--scenario", help="JSON scenario: start, time_scale, events, episodes, "
                                        "levels, positions (of the boards, metres; see "
                                        "emulator/scenario.py)")
    run.add_argument("--time-scale", type=float, help="scenario seconds per wall second "
                                                      "(720: a day in two minutes)")
    run.add_argument("--heap-kb", type=int,
                     help="a heap of this size (chip terms) instead of the board's: to "
                          "measure what a firmware needs, never to pass a test")
    run.add_argument("--chip-speed", action="store_true",
                     help="run the VM at the chip's speed: this host's speed measured against "
                          "the board's published figures (boards.yaml speed:)")
    run.add_argument("--speed-factor", type=float,
                     help="run the VM this many times slower than the host (implies chip speed)")
    run.set_defaults(func=_usage(cmd_run))
    image = sub.add_parser("image", help="write a stand-in MicroPython image for a board")
    image.add_argument("--board", default="esp32-devkitc")
    image.add_argument("-o", "--output", required=True)
    image.set_defaults(func=_usage(cmd_image))
    ctl = sub.add_parser("ctl", help="inspect a running board or inject a fault")
    ctl.add_argument("state", help="the board's state dir, e.g. /tmp/cn/state/node0")
    ctl.add_argument("command", help="status, wifi, rssi, power, press, hang, unplug, plug, "
                                     "corrupt, stuck, unstuck, pin, impulse")
    ctl.add_argument("args", nargs="*", help="key=value arguments, e.g. up=false")
    ctl.set_defaults(func=_usage(cmd_ctl))
    return parser


def _usage(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A subcommand whose errors (a board, a state dir, a control request, the VM that
    cannot be found) are the caller's to fix: exit code 2 with the message."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (BoardCatalogueError, ControlError, MicroPythonNotFound, ValueError,
                OSError) as exc:
            raise cli.CliError(str(exc), exit_code=cli.EXIT_USAGE) from None
    return run


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return cli.run("citynode-emu", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

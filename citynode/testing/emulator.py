"""Start emulated boards for tests through the real `citynode-emu run` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from citynode.emulator.control import control
from citynode.mosquitto import free_port, free_port_range

VENV_BIN = Path(sys.executable).parent


@dataclass
class BoardHandle:
    link: str
    url: str
    state: Path
    mac: str

    def control(self, cmd: str, **args):
        return control(self.state, cmd, **args)


@dataclass
class Emulator:
    """A running `citynode-emu run` process and its boards."""

    proc: subprocess.Popen
    boards: list[BoardHandle] = field(default_factory=list)
    speed_factor: float | None = None   # host time x this = chip time (chip speed only)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_emulator(tmp: Path, count: int = 1, board: str = "esp32-devkitc",
                   blank: bool = False, extra: list[str] | None = None,
                   timeout: float = 30, chip_speed: bool | float = False) -> Emulator:
    """`chip_speed`: True runs the boards at the chip's speed as measured on this host
    (`--chip-speed`), a number at that factor (`--speed-factor`)."""
    port = free_port() if count == 1 else free_port_range(count)
    if chip_speed is True:
        extra = ["--chip-speed", *(extra or [])]
    elif chip_speed:
        extra = ["--speed-factor", str(float(chip_speed)), *(extra or [])]
    cmd = [str(VENV_BIN / "citynode-emu"), "run", "--board", board,
           "--link", str(tmp / "node0"), "--rfc2217", str(port), "--state", str(tmp / "state"),
           "--count", str(count)] + (["--blank"] if blank else []) + (extra or [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(tmp / "emu.log", "ab"),
                            text=True)
    emu = Emulator(proc)
    deadline = time.monotonic() + timeout
    while len(emu.boards) < count:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line:
            emu.stop()
            raise RuntimeError(f"citynode-emu exited early: {(tmp / 'emu.log').read_text()}")
        info = json.loads(line)
        emu.speed_factor = info.get("speed_factor")
        emu.boards.append(BoardHandle(info["link"], info["rfc2217"], Path(info["state"]),
                                      info["mac"].replace(":", "")))
        if time.monotonic() > deadline:
            emu.stop()
            raise RuntimeError("citynode-emu did not report its boards in time")
    return emu


def guarded(args: Sequence[str], soft_reset: bool = True) -> list[str]:
    """mpremote arguments that first set the node's watchdog long (WDT_GUARD), then do
    what `args` do. A started machine.WDT runs on across the soft reset mpremote makes
    before its first command (as on the chip), so a session longer than the app's
    timeout would be bitten: the guard runs right after the raw REPL is entered (no soft
    reset before it), then the soft reset (unless soft_reset=False or `args` start with
    `resume`), then `args`. On a board with no dog it arms one for SESSION_WDT_MS."""
    from citynode.provisioning.device import WDT_GUARD

    rest = list(args)
    if rest[:1] == ["resume"]:
        rest, soft_reset = rest[1:], False
    head = ["resume", "exec", WDT_GUARD]
    if soft_reset:
        head += ["+", "soft-reset"]
    return head + (["+", *rest] if rest else [])


def mpremote(port: str, *args: str, timeout: float = 60, check: bool = True,
             guard: bool = True) -> str:
    """Run the unmodified mpremote CLI against a board; returns its stdout. With guard
    (the default) the node's watchdog is set long first (see guarded)."""
    argv = guarded(args) if guard else list(args)
    proc = subprocess.run([str(VENV_BIN / "mpremote"), "connect", port, *argv],
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"mpremote {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def hard_reset(board: BoardHandle, timeout: float = 20) -> None:
    """`mpremote reset`, then wait for the new boot: mpremote returns before the board's
    100 ms sleep ahead of machine.reset(), and a session opened in it interrupts the
    sleep with its Ctrl-C, so the board never resets (on a real ESP32 too). No soft
    reset first (`resume`): it would count as the boot waited for."""
    boots = board.control("status")["boots"]
    mpremote(board.link, "resume", "reset")
    wait_for(lambda: (status := board.control("status"))["boots"] > boots
             and status["mode"] == "running", timeout=timeout, what="the board's reboot")


def esptool(port: str, *args: str, timeout: float = 240, check: bool = True) -> str:
    """Run the unmodified esptool CLI against a board; returns stdout and stderr."""
    proc = subprocess.run([str(VENV_BIN / "esptool"), "--port", port, *args],
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"esptool {' '.join(args)} failed ({proc.returncode}):\n{out}")
    return out


def wait_for(predicate, timeout: float = 10, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


os.environ.setdefault("PYTHONUNBUFFERED", "1")


# The firmware as shipped: firmware/ of this checkout, or the installed package data.
FIRMWARE = Path(str(resources.files("citynode") / "firmware"))


def vm_mpy() -> int:
    """sys.implementation._mpy of the emulated boards' VM (the unix port)."""
    from citynode.emulator.vm import micropython_binary

    out = subprocess.run([micropython_binary(), "-c",
                          "import sys; print(sys.implementation._mpy)"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout)


def install_firmware(board: BoardHandle, files: dict[str, str] | None = None) -> None:
    """Put firmware/ on a board as provisioning deploys it, plus extra files.

    The modules are compiled by mpy-cross. Where the board's image has a ROMFS partition
    they go there through the unmodified `mpremote romfs deploy` (bytecode run in place
    from flash); the stock images have none, so there the .mpy files go on the
    filesystem and load into the heap, as on a stock devkitc. main.py and `files` (path
    -> text: config, secrets) are written into the board's filesystem folder, which is
    what the flash holds. A soft reset mounts the image.
    """
    from citynode.emulator.image import VFS_OFFSET, read_partitions
    from citynode.provisioning.deploy import build_plan

    with open(board.state / "flash.bin", "rb") as flash:
        has_romfs = "romfs" in read_partitions(flash.read(VFS_OFFSET))
    plan = build_plan(FIRMWARE, {"mpy": vm_mpy(), "romfs": has_romfs}, use_mpy=True)
    if plan.romfs is not None:
        image = board.state / "firmware.romfs"
        image.write_bytes(plan.romfs)
        mpremote(board.link, "romfs", "deploy", str(image))
    fs = board.state / "fs"
    for path, data in {**plan.files, **{p: t.encode() for p, t in (files or {}).items()}}.items():
        dest = fs / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    mpremote(board.link, "soft-reset")


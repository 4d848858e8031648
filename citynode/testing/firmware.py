"""Helpers for firmware tests on an emulated board: compiled install, board scripts.

The firmware goes on the board with citynode.testing.emulator.install_firmware (compiled, in the
ROMFS partition), as it goes on a devkitc.
"""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent.futures import Future

from citynode.testing.emulator import VENV_BIN, BoardHandle, guarded

_RUNNING: list[subprocess.Popen] = []


def run_async(board: BoardHandle, code: str, timeout: float = 90) -> Future:
    """Run `code` on the board through `mpremote exec` in the background (the watchdog
    set long first: citynode.testing.emulator.guarded); the future gives its stdout (or
    an AssertionError with what it printed). stop_leftovers() ends it."""
    fut: Future = Future()
    proc = subprocess.Popen([str(VENV_BIN / "mpremote"), "connect", board.link,
                             *guarded(["exec", code])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _RUNNING.append(proc)

    def work():
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if proc.returncode == 0:
            fut.set_result(out)
        else:
            fut.set_exception(AssertionError(f"mpremote exec failed ({proc.returncode}):\n"
                                             f"{out}\n{err}"))

    threading.Thread(target=work, daemon=True).start()
    return fut


def stop_leftovers() -> None:
    """Kill board scripts a failed test left running (they hold the board's serial port)."""
    while _RUNNING:
        proc = _RUNNING.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_file(board: BoardHandle, name: str, timeout: float = 30,
              run: Future | None = None) -> str:
    """Wait until the board wrote `name` in its filesystem; returns its text.

    With `run` (the script that should write it), fail at once with its output if
    it ended first, and say what it printed if it is still running at the timeout.
    """
    path = board.state / "fs" / name
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        if run is not None and run.done():
            exc = run.exception()
            raise AssertionError(f"the board script ended before writing {name}: "
                                 f"{exc if exc else run.result()}")
        time.sleep(0.05)
    raise AssertionError(f"the board did not write {name} within {timeout}s"
                         + (" (its script is still running)" if run is not None else ""))


def signal_board(board: BoardHandle, name: str, text: str = "") -> None:
    """Tell a running board script to go on: it polls for this file."""
    (board.state / "fs" / name).write_text(text)


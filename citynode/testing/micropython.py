"""Run MicroPython code on the real unix port, with an ESP32-sized heap.

Host tests use this to exercise firmware/ modules where no board is needed
(wire format, DSP, spool: code that needs no board).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from citynode.emulator.vm import micropython_binary
from citynode.provisioning.device import last_json

from .emulator import FIRMWARE

DEVKITC_HEAP_KB = 110


def run_micropython(code: str, *, heap_kb: int = DEVKITC_HEAP_KB, path: list[Path] | None = None,
                    timeout: float = 120, stdin: bytes | None = None) -> str:
    """Run `code` and return its stdout; a MicroPython exception fails with its traceback."""
    search = [str(p) for p in (path if path is not None else [FIRMWARE])]
    env = dict(os.environ, MICROPYPATH=":".join(search + [".frozen"]))
    proc = subprocess.run([micropython_binary(), "-X", f"heapsize={heap_kb}k", "-c", code],
                          input=stdin, capture_output=True, timeout=timeout, env=env)
    out = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        raise AssertionError(f"MicroPython exited {proc.returncode}:\n{out}\n"
                             f"{proc.stderr.decode(errors='replace')}")
    return out


def run_micropython_json(code: str, **kwargs) -> Any:
    """Run code whose last line of output is JSON (printed with json.dumps); that value."""
    return last_json(run_micropython(code, **kwargs))

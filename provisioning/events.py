"""Progress as a stream of typed events per port.

Every step reports through an `Events` sink instead of printing, so the same run
renders as progress bars for a technician or as JSON lines for a script (--json),
and parallel boards never interleave half lines: one lock guards the output.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

STATES = ("start", "progress", "done", "skipped", "failed", "info")


@dataclass
class Event:
    port: str
    step: str
    state: str
    message: str = ""
    done: int | None = None
    total: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v not in (None, {}, "")}
        out["time"] = round(self.time, 3)
        return out


Sink = Callable[[Event], None]


class Events:
    """The per-run event bus; `for_port` gives a step reporter bound to one board."""

    def __init__(self, sinks: list[Sink] | None = None):
        self.sinks = list(sinks or [])
        self.history: list[Event] = []
        self._lock = threading.Lock()

    def emit(self, event: Event) -> None:
        with self._lock:
            self.history.append(event)
            for sink in self.sinks:
                sink(event)

    def for_port(self, port: str) -> PortEvents:
        return PortEvents(self, port)


class PortEvents:
    def __init__(self, bus: Events, port: str):
        self.bus = bus
        self.port = port

    def __call__(self, step: str, state: str, message: str = "", done: int | None = None,
                 total: int | None = None, **data: Any) -> None:
        self.bus.emit(Event(self.port, step, state, message, done, total, data))

    def start(self, step: str, message: str = "", **data: Any) -> None:
        self(step, "start", message, **data)

    def progress(self, step: str, done: int, total: int, message: str = "") -> None:
        self(step, "progress", message, done, total)

    def done(self, step: str, message: str = "", **data: Any) -> None:
        self(step, "done", message, **data)

    def skipped(self, step: str, message: str, **data: Any) -> None:
        self(step, "skipped", message, **data)

    def failed(self, step: str, message: str, **data: Any) -> None:
        self(step, "failed", message, **data)

    def info(self, step: str, message: str, **data: Any) -> None:
        self(step, "info", message, **data)


def json_sink(stream: TextIO | None = None) -> Sink:
    """One JSON object per line: {"port", "step", "state", "message", "done", "total", ...}."""

    def sink(event: Event) -> None:
        out = stream or sys.stdout
        out.write(json.dumps(event.to_dict(), default=str) + "\n")
        out.flush()

    return sink


class BarSink:
    """Human rendering: a line per step change and a text bar for progress.

    Progress lines are throttled (every 25% or on completion) so several boards
    in parallel stay readable in a plain terminal or a CI log.
    """

    MARK = {"start": "..", "done": "ok", "skipped": "==", "failed": "!!", "info": "  "}

    def __init__(self, stream: TextIO | None = None, width: int = 24):
        self.stream = stream
        self.width = width
        self._last: dict[tuple[str, str], int] = {}

    def __call__(self, event: Event) -> None:
        out = self.stream or sys.stderr
        label = _short(event.port)
        if event.state == "progress":
            if not event.total:
                return
            quarter = int(4 * (event.done or 0) / event.total)
            key = (event.port, event.step)
            if self._last.get(key) == quarter and event.done != event.total:
                return
            self._last[key] = quarter
            filled = int(self.width * (event.done or 0) / event.total)
            bar = "#" * filled + "-" * (self.width - filled)
            out.write(f"{label:<18} {event.step:<8} [{bar}] {event.done}/{event.total} "
                      f"{event.message}\n")
        else:
            out.write(f"{label:<18} {event.step:<8} {self.MARK.get(event.state, '  ')} "
                      f"{event.message}\n")
        out.flush()


def _short(port: str) -> str:
    return port.replace("rfc2217://", "").replace("/dev/", "")[-18:]

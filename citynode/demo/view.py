"""What the demo shows: log lines (headless, CI, or before the live phase) and a live
terminal view redrawn about once a second with plain ANSI codes (no curses, no extra
dependency), 80 columns wide."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from .ledger import NodeState

WIDTH = 80
EVENTS_SHOWN = 6


@dataclass
class GatewayCounters:
    """The gateway as its /metrics says; `reachable` is False while it does not answer."""

    reachable: bool = False
    uplink_up: bool = False
    buffered: int = 0
    forwarded: int = 0
    rejected: dict[str, float] = field(default_factory=dict)

    @property
    def rejected_total(self) -> int:
        return int(sum(self.rejected.values()))


@dataclass
class Status:
    """One frame: everything the live view shows."""

    phase: str
    elapsed: float
    duration: float
    nodes: dict[str, NodeState]
    gateway: GatewayCounters
    produced: int
    verified: int
    missing: int


class LogView:
    """One short line per phase and event (and a status line now and then while live)."""

    status_every_s = 10.0

    def __init__(self, logs: str, out: TextIO | None = None):
        self.out = out or sys.stdout
        self.logs = logs
        self.started = time.monotonic()
        self.events: list[str] = []
        self._last_status = 0.0

    def line(self, text: str) -> None:
        self.out.write(f"demo [{time.monotonic() - self.started:6.1f} s] {text}\n")
        self.out.flush()

    def phase(self, text: str) -> None:
        self.line(f"== {text}")

    def event(self, text: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')}  {text}")
        self.line(text)

    def progress(self, text: str) -> None:
        self.line(f"   {text}")

    def tick(self, status: Status) -> None:
        now = time.monotonic()
        if now - self._last_status >= self.status_every_s:
            self._last_status = now
            gw = status.gateway
            self.line(f"   {status.phase.split(' (')[0]} {status.elapsed:3.0f}/"
                      f"{status.duration:.0f} s: produced "
                      f"{status.produced}, verified upstream {status.verified}, gateway "
                      f"buffered {gw.buffered} forwarded {gw.forwarded} rejected "
                      f"{gw.rejected_total}, uplink {'up' if gw.uplink_up else 'DOWN'}")

    def final(self, status: Status) -> None:
        """What the city last saw of each node (the live view has it on screen already)."""
        now = time.time()
        for device in sorted(status.nodes):
            node = status.nodes[device]
            values = ", ".join(f"{label} {node.values[key]:.1f}" for key, label in
                               (("lux", "lux"), ("laeq", "LAeq dBA"), ("pm25", "PM2.5 ug/m3"),
                                ("temp", "temp C")) if key in node.values)
            seen = f"{now - node.last_seen:.0f} s ago" if node.last_seen else "never"
            self.line(f"   {device}: {values or 'no readings'}; {node.readings} readings, "
                      f"{node.events} events, last seen {seen}")

    def close(self) -> None:
        pass


class LiveView(LogView):
    """Log lines until the live phase starts, then a full-screen redraw once a second."""

    def __init__(self, logs: str, out: TextIO | None = None):
        super().__init__(logs, out)
        self.live = False
        self._last_draw = 0.0

    def event(self, text: str) -> None:
        if self.live:  # shown in the frame's event list, not scrolled
            self.events.append(f"{time.strftime('%H:%M:%S')}  {text}")
        else:
            super().event(text)

    def phase(self, text: str) -> None:
        if not self.live:
            super().phase(text)

    def tick(self, status: Status) -> None:
        now = time.monotonic()
        if now - self._last_draw < 1.0:
            return
        if not self.live:
            self.live = True
            self.out.write("\x1b[?25l\x1b[2J")  # hide the cursor, clear once
        self._last_draw = now
        lines = [line[:WIDTH] for line in render(status, self.events, self.logs)]
        self.out.write("\x1b[H" + "".join(f"{line}\x1b[K\n" for line in lines) + "\x1b[J")
        self.out.flush()

    def final(self, status: Status) -> None:
        if not self.live:
            super().final(status)

    def close(self) -> None:
        if self.live:
            self.out.write("\x1b[?25h")  # the cursor back
            self.out.flush()
            self.live = False


def render(status: Status, events: list[str], logs: str) -> list[str]:
    """The frame's lines; each fits 80 columns."""
    gw = status.gateway
    uplink = "up" if gw.uplink_up else "DOWN"
    if not gw.reachable:
        uplink = "? (gateway not answering)"
    rejected = ", ".join(f"{reason} {n:g}" for reason, n in sorted(gw.rejected.items()) if n)
    lines = [
        f"citynode demo   {status.elapsed:3.0f}/{status.duration:.0f} s   {status.phase}",
        "",
        "At the city broker, verified against the fleet registry:",
        f"  {'node':<16}{'lux':>8}{'LAeq dBA':>9}{'PM2.5':>6}{'temp C':>7}{'clock':>7}"
        f"{'readings':>9}{'last seen':>11}",
    ]
    now = time.time()
    for device in sorted(status.nodes):
        node = status.nodes[device]
        lines.append("  " + _node_row(device, node, now))
        if node.lamp_source is not None and "lamp" in node.values:
            why = _LAMP_BY.get(node.lamp_source, node.lamp_source)
            lines.append(f"    lamp {node.values['lamp']:.0f}% ({why})")
    if not status.nodes:
        lines.append("  (nothing yet: the nodes' first window is on its way)")
    lines += [
        "",
        f"Gateway: uplink {uplink}   buffered {gw.buffered}   forwarded {gw.forwarded}   "
        f"rejected {gw.rejected_total}",
        f"  rejected by reason: {rejected or '-'}",
        f"  backlog: {_bar(gw.buffered)}",
        f"Readings: produced {status.produced}   verified upstream {status.verified}   "
        f"not upstream yet {status.missing}",
        "",
        "Events:",
    ]
    lines += [f"  {e}" for e in events[-EVENTS_SHOWN:]] or ["  -"]
    lines += ["", "Ctrl-C stops everything.", f"Logs: {logs}"]
    return lines


# what set a lamp (node/lighting.py), in the demo's words
_LAMP_BY = {"day": "daylight", "dark": "dark by its light sensor", "quiet": "quiet hours",
            "event": "an impulse", "operator": "the operator", "schedule": "the schedule",
            "no clock": "no light reading, no clock yet"}


def _bar(count: int, width: int = 50) -> str:
    """The gateway's buffer as a bar, so the growth during the outage and the drain show."""
    if count <= 0:
        return "empty"
    return "#" * min(count, width) + ("+" if count > width else "") + f" {count}"


def _node_row(device: str, node: NodeState, now: float) -> str:
    def cell(name: str, width: int) -> str:
        value = node.values.get(name)
        return f"{value:>{width}.1f}" if value is not None else f"{'-':>{width}}"

    seen = f"{now - node.last_seen:.0f} s ago" if node.last_seen else "-"
    count = f"{node.readings}" + (f"+{node.events}ev" if node.events else "")
    clock = node.values.get("clock")   # how far the node's last sync moved its clock
    clock_cell = f"{clock:>+5.0f}ms" if clock is not None else f"{'-':>7}"
    return (f"{device:<16}{cell('lux', 8)}{cell('laeq', 9)}{cell('pm25', 6)}"
            f"{cell('temp', 7)}{clock_cell:>7}{count:>9}{seen:>11}")

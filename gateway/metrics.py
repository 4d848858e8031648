"""Counters and gauges, served as Prometheus text on /metrics and as JSON on /health."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("citynode.gateway.metrics")

PREFIX = "citynode_gateway_"
HELP = {
    "received_total": ("counter", "Envelopes received from the local broker"),
    "verified_total": ("counter", "Envelopes whose signature verified"),
    "rejected_total": ("counter", "Envelopes rejected, by reason"),
    "stored_total": ("counter", "Envelopes committed to the buffer"),
    "dropped_total": ("counter", "Accepted envelopes lost to quota or TTL, by device and reason"),
    "evicted_total": ("counter", "Buffered envelopes evicted, by reason"),
    "forwarded_total": ("counter", "Rows acknowledged by the upstream broker, by lane"),
    "forward_failed_total": ("counter", "Upstream PUBACKs with an error reason code"),
    "commits_total": ("counter", "Group commits"),
    "uplink_connects_total": ("counter", "Successful upstream connections"),
    "downlink_total": ("counter", "Downlink commands, by result"),
    "registry_reloads_total": ("counter", "Registry reloads (SIGHUP)"),
    "store_quarantined_total": ("counter", "Corrupt databases quarantined by this process"),
    "buffered_messages": ("gauge", "Rows waiting in the buffer (gap records included)"),
    "buffered_bytes": ("gauge", "Bytes the buffer's rows account for"),
    "oldest_buffered_age_seconds": ("gauge", "Age of the oldest buffered row"),
    "uplink_up": ("gauge", "1 while connected to the upstream broker"),
    "local_up": ("gauge", "1 while connected to the local broker"),
    "inflight": ("gauge", "Upstream publishes waiting for PUBACK"),
    "registry_devices": ("gauge", "Devices in the fleet registry"),
    "registry_errors": ("gauge", "Registry files that failed to load"),
    "store_quarantined_files": ("gauge", "Quarantined database files in the state dir"),
}

Labels = tuple[tuple[str, str], ...]


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[Labels, float]] = {}
        self._collectors: list[Callable[[], dict[str, float]]] = []

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values.setdefault(name, {})
            series[key] = series.get(key, 0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values.setdefault(name, {})[tuple(sorted(labels.items()))] = value

    def collector(self, fn: Callable[[], dict[str, float]]) -> None:
        """Register a function that returns gauges (name -> value) at scrape time."""
        self._collectors.append(fn)

    def _collect(self) -> None:
        for fn in self._collectors:
            try:
                for name, value in fn().items():
                    self.set(name, value)
            except Exception:  # a gauge must never break a scrape
                log.exception("metrics collector failed")

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0)

    def total(self, name: str) -> float:
        with self._lock:
            return sum(self._values.get(name, {}).values())

    def snapshot(self) -> dict[str, dict[str, float]]:
        self._collect()
        with self._lock:
            return {name: {",".join(f"{k}={v}" for k, v in key): value
                           for key, value in series.items()}
                    for name, series in self._values.items()}

    def render(self) -> str:
        self._collect()
        lines: list[str] = []
        with self._lock:
            for name in sorted(set(HELP) | set(self._values)):
                kind, text = HELP.get(name, ("untyped", name))
                lines += [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} {kind}"]
                series = self._values.get(name) or ({(): 0} if kind == "counter" else {})
                for key, value in sorted(series.items()):
                    label = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
                    lines.append(f"{PREFIX}{name}{{{label}}} {value:g}" if label
                                 else f"{PREFIX}{name} {value:g}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsServer:
    """/metrics (Prometheus text) and /health (JSON; 503 when the gateway is unhealthy)."""

    def __init__(self, address: tuple[str, int], metrics: Metrics,
                 health: Callable[[], tuple[bool, dict]]):
        metrics_ref, health_ref = metrics, health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path.split("?")[0] == "/metrics":
                    body, status = metrics_ref.render().encode(), 200
                    ctype = "text/plain; version=0.0.4; charset=utf-8"
                elif self.path.split("?")[0] in ("/health", "/"):
                    ok, data = health_ref()
                    body, status = json.dumps(data, indent=1).encode(), 200 if ok else 503
                    ctype = "application/json"
                else:
                    body, status, ctype = b"not found: try /metrics or /health\n", 404, \
                        "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(address, Handler)
        self.server.daemon_threads = True
        self.address = self.server.server_address[:2]
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

"""The gateway daemon: wires store, links, relay and metrics; signals; systemd notify.

Built in dependency order, each stage given what it needs: the store; the pole link
(the pole's broker: verify, group commit, ack), which commits into the store; the
downlink relay, which publishes through the pole link; the city link (the city's
broker), which forwards what the store holds (the store tells it when rows are
committed) and hands operator commands to the relay.

SIGTERM/SIGINT: clean shutdown (queued envelopes committed and acknowledged, in-flight
PUBACKs awaited, acked rows deleted, status offline). SIGHUP: reload the registry.
systemd: READY=1 once started, WATCHDOG=1 only while every worker loop is alive; a
loop silent for `stall_exit_s`, a failed commit, or a local broker gone for
`local.down_exit_s` ends `run()` with a non-zero code so systemd restarts us.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from citynode.place import places
from citynode.registry import Registry, RegistryError, load_registry

from .city import CityLink
from .config import Config
from .downlink import DownlinkRelay, load_operator_key
from .logs import RateLimitedLog
from .metrics import Metrics, MetricsServer
from .pole import PoleLink
from .store import Store

log = logging.getLogger("citynode.gateway")

EXIT_OK, EXIT_STORE, EXIT_STALLED, EXIT_LOCAL_DOWN = 0, 3, 4, 5
TTL_SWEEP_S = 60.0
STATUS_EVERY_S = 2.0
STATUS_FILE = "status.json"


def sd_notify(message: str) -> bool:
    """Send a datagram to systemd's $NOTIFY_SOCKET (no-op when not under systemd)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
        return True
    except OSError as exc:
        log.warning("systemd notify failed: %s", exc)
        return False


class Gateway:
    def __init__(self, config: Config):
        self.config = config
        self.metrics = Metrics()
        self.started = time.time()
        self.rlog = RateLimitedLog(log, 30.0)
        self.registry = self._load_registry()
        self.store = Store(config.db_path, config.store, on_drop=self._on_drop)
        if self.store.quarantined:
            self.metrics.inc("store_quarantined_total", len(self.store.quarantined))
        self.pole = PoleLink(config, self.store, lambda: self.registry, self.metrics)
        self.downlink = (DownlinkRelay(load_operator_key(config.operator_key),
                                       self.pole.publish, self.metrics)
                         if config.operator_key else None)
        self.city = CityLink(config, self.store, self.metrics,
                             on_command=self.downlink.handle if self.downlink else None)
        self.city.set_places(places(self.registry))
        self.metrics.collector(self._gauges)
        self.http = (MetricsServer(config.metrics_address, self.metrics, self.health)
                     if config.metrics_address else None)
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.exit_reason = ""

    # --- pieces -------------------------------------------------------------------------------

    def _load_registry(self) -> Registry:
        registry = load_registry(self.config.registry_dir)
        for error in registry.errors:
            log.error("registry: %s (this device is rejected until it is fixed)", error)
        self.metrics.set("registry_devices", len(registry))
        self.metrics.set("registry_errors", len(registry.errors))
        log.info("registry %s: %d devices", self.config.registry_dir, len(registry))
        return registry

    def reload_registry(self) -> None:
        try:
            self.registry = self._load_registry()
            self.metrics.inc("registry_reloads_total")
        except RegistryError as exc:
            log.error("registry reload failed, keeping the previous one: %s", exc)
            return
        self.pole.retry_unverified()  # what arrived before the registry knew its node
        self.city.set_places(places(self.registry))

    def _on_drop(self, device: str, reason: str, count: int, stored: bool) -> None:
        self.metrics.inc("dropped_total", count, device=device, reason=reason)
        if stored:
            self.metrics.inc("evicted_total", count, reason=reason)
        self.rlog.warning(f"drop-{reason}", "dropped %d envelope(s) of %s (%s); a gap record "
                          "goes upstream", count, device, reason)

    def _gauges(self) -> dict[str, float]:
        stats = self.store.stats()
        oldest = stats["oldest_received_at"]
        return {"buffered_messages": stats["rows"], "buffered_bytes": stats["bytes"],
                "oldest_buffered_age_seconds": max(0.0, time.time() - oldest) if oldest else 0,
                "store_quarantined_files": self.store.quarantined_files()}

    def stalled(self) -> str | None:
        limit, now = self.config.stall_exit_s, time.monotonic()
        for name, beat in (("ingest writer", self.pole.heartbeat),
                           ("forwarder", self.city.heartbeat)):
            if now - beat > limit:
                return f"the {name} loop has been stuck for {now - beat:.0f} s"
        return None

    def health(self) -> tuple[bool, dict]:
        stats = self.store.stats()
        problem = self.stalled() or self.pole.failed
        if not self.pole.connected:
            problem = problem or "local broker unreachable"
        oldest = stats["oldest_received_at"]
        data = {
            "status": "ok" if not problem else "unhealthy",
            "problem": problem or "",
            "gateway": self.config.gateway_id,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "local": "up" if self.pole.connected and self.pole.subscribed else "down",
            "uplink": "up" if self.city.connected else "down",
            "buffered": stats["rows"], "buffered_bytes": stats["bytes"],
            "oldest_buffered_age_s": round(time.time() - oldest, 1) if oldest else 0,
            "received": self.metrics.total("received_total"),
            "forwarded": self.metrics.total("forwarded_total"),
            "rejected": self.metrics.total("rejected_total"),
            "dropped": self.metrics.total("dropped_total"),
            "devices": len(self.registry),
            "registry_errors": len(self.registry.errors),
            "unverified": self.pole.unverified.count(),
            "quarantined_files": self.store.quarantined_files(),
        }
        return not problem, data

    # --- lifecycle ----------------------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def request_reload(self, *_: object) -> None:
        self._reload.set()

    def run(self) -> int:
        """Run until SIGTERM (0) or a failure that needs a restart (non-zero)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
            signal.signal(signal.SIGHUP, self.request_reload)
        if self.http:
            self.http.start()
            log.info("metrics and health on http://%s:%d/", *self.http.address)
        self.pole.start()
        self.city.start()
        sd_notify("READY=1")
        log.info("gateway %s running (state %s)", self.config.gateway_id, self.config.db_path)
        code = self._supervise()
        if code == EXIT_STALLED:  # a stuck thread may hold locks: leave without waiting
            log.error("stopping: %s", self.exit_reason)
            sd_notify("STOPPING=1")
        else:
            self.shutdown()
        return code

    def _supervise(self) -> int:
        watchdog_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        ping_every = watchdog_usec / 2e6 if watchdog_usec else 1.0
        last_ping = last_sweep = last_status = 0.0
        while not self._stop.wait(0.2):
            now = time.monotonic()
            if self._reload.is_set():
                self._reload.clear()
                self.reload_registry()
            if self.pole.failed:
                self.exit_reason = self.pole.failed
                return EXIT_STORE
            stall = self.stalled()
            if stall:
                self.exit_reason = f"{stall}; exiting so systemd restarts the gateway"
                return EXIT_STALLED
            down = self.pole.down_since
            if down is not None and now - down > self.config.local.down_exit_s:
                self.exit_reason = (f"local broker {self.config.local.host}:"
                                    f"{self.config.local.port} unreachable for {now - down:.0f} s"
                                    "; is mosquitto running?")
                return EXIT_LOCAL_DOWN
            if now - last_ping >= ping_every:
                sd_notify("WATCHDOG=1")
                last_ping = now
            if now - last_sweep >= TTL_SWEEP_S:
                self.store.sweep_ttl()
                last_sweep = now
            if now - last_status >= STATUS_EVERY_S:
                self.write_status()
                last_status = now
        return EXIT_OK

    def write_status(self) -> None:
        _, data = self.health()
        data["written_at"] = time.time()
        path = self.config.state_dir / STATUS_FILE
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, path)
        except OSError as exc:
            self.rlog.warning("status", "cannot write %s: %s", path, exc)

    def shutdown(self) -> None:
        sd_notify("STOPPING=1")
        if self.exit_reason:
            log.error("stopping: %s", self.exit_reason)
        else:
            log.info("stopping: committing and acknowledging what is queued")
        self.pole.stop()
        self.city.stop()
        self.write_status()
        if self.http:
            self.http.stop()
        buffered = self.store.stats()["rows"]
        self.pole.unverified.close()
        self.store.close()
        log.info("stopped; received %d, forwarded %d, %d buffered",
                 self.metrics.total("received_total"), self.metrics.total("forwarded_total"),
                 buffered)


def read_status(state_dir: Path) -> dict | None:
    try:
        return json.loads((state_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None

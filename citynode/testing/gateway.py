"""The gateway as a real subprocess, plus a node publisher and an upstream collector.

    gw = GatewayProcess(tmp_path, local_broker, upstream_broker, devices)
    gw.start()                  # `python -m citynode.gateway.cli run --config ...`
    gw.metric("rejected_total", reason="revoked")
    gw.kill() / gw.terminate()  # SIGKILL / SIGTERM (returns the exit code)
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from citynode import wire
from citynode.gateway.config import parse_config
from citynode.gateway.metrics import Metrics
from citynode.gateway.pole import PoleLink
from citynode.gateway.scrape import metric_sum
from citynode.gateway.store import Store
from citynode.mosquitto import Mosquitto, free_port
from citynode.registry import Registry, load_registry
from citynode.subscriber import Message, Subscriber
from citynode.testing.keys import TestDevice, seq_of

PREFIX = "city/test"
GATEWAY_ID = "pole-t1"


def config_text(sections: dict[str, dict]) -> str:
    """A gateway.toml from {section: {key: value}} (strings, numbers, booleans)."""
    return "\n".join(
        f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
        for name, values in sections.items())


class GatewayProcess:
    def __init__(self, workdir: Path, local: Mosquitto, upstream: Mosquitto,
                 devices: Iterable[TestDevice] = (), *, store: dict | None = None,
                 upstream_extra: dict | None = None, gateway_extra: dict | None = None,
                 local_extra: dict | None = None):
        self.workdir = Path(workdir)
        self.registry = self.workdir / "registry"
        self.registry.mkdir(parents=True, exist_ok=True)
        self.state = self.workdir / "state"
        for device in devices:
            device.register(self.registry)
        self.metrics_port = free_port()
        self.config = self.workdir / "gateway.toml"
        upstream_cfg = {"host": upstream.host, "port": upstream.port, "tls": False,
                        "topic_prefix": PREFIX, "backoff_min_s": 0.2, "backoff_max_s": 1.0,
                        **(upstream_extra or {})}
        store_cfg = {"min_free_bytes": 0, "commit_ms": 50, **(store or {})}
        gateway_cfg = {"id": GATEWAY_ID, "state_dir": str(self.state),
                       "registry_dir": str(self.registry), "stall_exit_s": 30,
                       **(gateway_extra or {})}
        self._sections = {"gateway": gateway_cfg,
                          "local": {"host": local.host, "port": local.port,
                                    **(local_extra or {})},
                          "upstream": upstream_cfg, "store": store_cfg}
        self._write_config()
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "gateway.log"
        self.starts = 0

    def _write_config(self) -> None:
        metrics = {"metrics": {"address": f"127.0.0.1:{self.metrics_port}"}}
        self.config.write_text(config_text({**self._sections, **metrics}))

    def start(self, wait: bool = True, timeout: float = 15.0,
              env: dict[str, str] | None = None, program: str | None = None,
              user: str | None = None) -> GatewayProcess:
        """`program` (default: this Python's citynode) runs as `user` (default: ours) with
        the unit's UMask; the log stays ours."""
        self.starts += 1
        command = [program] if program else [sys.executable, "-m", "citynode.gateway.cli"]
        as_user: dict = {}
        if user:
            account = pwd.getpwnam(user)
            as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": [],
                       "umask": 0o077}
        with self.log_path.open("a") as log:
            log.write(f"--- start {self.starts}\n")
            self.proc = subprocess.Popen(
                [*command, "run", "--config", str(self.config)], stdout=log,
                stderr=subprocess.STDOUT, cwd=self.workdir,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, **as_user)
        if wait:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    if self._port_taken():      # free_port() is a moment old: again
                        self.metrics_port = free_port()
                        self._write_config()
                        return self.start(wait, timeout, env, program, user)
                    raise RuntimeError(f"gateway exited {self.proc.returncode}:\n{self.log()}")
                health = self.health()
                if health and health.get("local") == "up":
                    return self
                time.sleep(0.05)
            raise RuntimeError(f"gateway not healthy in {timeout} s:\n{self.log()}")
        return self

    def _port_taken(self) -> bool:
        """Whether this start failed because its metrics port was taken meanwhile (by
        another test's connection: free_port() only says it was free when it looked)."""
        last = self.log().rsplit(f"--- start {self.starts}\n", 1)[-1]
        return "Address already in use" in last and self.starts < 5

    def health(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/health",
                                        timeout=1) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())
        except (OSError, ValueError):
            return None

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=2) as resp:
            return resp.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the series of `name` whose labels include `labels`."""
        return metric_sum(self.metrics_text(), name, **labels)

    def wait_for(self, predicate, timeout: float = 20.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n{self.log()}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def terminate(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


class Collector(Subscriber):
    """The city: a persistent session on the upstream broker that records what the gateway
    sends, as (topic, payload, user properties, retain)."""

    def __init__(self, broker: Mosquitto, topic: str = f"{PREFIX}/#"):
        self.records: list[tuple[str, bytes, dict[str, str], bool]] = []
        self.up_count = 0  # envelopes received: cheap to poll (envelopes() copies)
        super().__init__(broker.host, broker.port, topic, persistent=True,
                         on_message=self._collect)

    def _collect(self, message: Message) -> None:
        with self.lock:
            self.records.append((message.topic, message.payload, message.user_properties,
                                 message.retain))
            if "/up/" in message.topic:
                self.up_count += 1

    def envelopes(self) -> list[tuple[str, bytes, dict[str, str]]]:
        with self.lock:
            return [(t, p, u) for t, p, u, _ in self.records if "/up/" in t]

    def keys(self) -> list[tuple[str, int]]:
        return [seq_of(p) for _, p, _ in self.envelopes()]

    def of(self, kind: str) -> list[tuple[str, bytes, dict[str, str], bool]]:
        with self.lock:
            return [m for m in self.records if f"/{kind}/" in m[0] or m[0].endswith(kind)]


class Node:
    """A node's MQTT side: publishes envelopes to the local broker at QoS 1."""

    def __init__(self, broker: Mosquitto, client_id: str = "node"):
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(100)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, device: str, data: bytes, wait: bool = True):
        info = self.client.publish(wire.up_topic(device), data, qos=1)
        if wait:
            info.wait_for_publish(10)
        return info

    def publish_all(self, items: Iterable[tuple[str, bytes]]) -> None:
        infos = [self.publish(d, e, wait=False) for d, e in items]
        for info in infos:
            info.wait_for_publish(30)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class RegistryDir:
    """The registry as the daemon holds it: load() again is its SIGHUP."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.current = load_registry(directory)

    def __call__(self) -> Registry:
        return self.current

    def load(self) -> None:
        self.current = load_registry(self.directory)


def pole_link(tmp_path: Path, devices: Iterable[TestDevice]) -> tuple[PoleLink, Metrics, Store]:
    """The gateway's ingest in-process, no broker: verify with handle(), store with
    commit() or the store's insert(); `devices` registered in tmp_path / "registry"
    (after a change there, `link.verifier.registry.load()` is the daemon's reload)."""
    registry_dir = tmp_path / "registry"
    for device in devices:
        device.register(registry_dir)
    config = parse_config({"gateway": {"id": "test", "registry_dir": str(registry_dir),
                                       "state_dir": str(tmp_path)},
                           "upstream": {"host": "localhost", "topic_prefix": "x"}})
    metrics = Metrics()
    store = Store(tmp_path / "gateway.db", config.store)
    return PoleLink(config, store, RegistryDir(registry_dir), metrics), metrics, store

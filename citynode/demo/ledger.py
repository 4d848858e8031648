"""What the nodes produced on the pole, and what reached the city verified.

Two MQTT subscribers feed one Ledger. On the pole's broker, `citynode/up/#` is what
the nodes published; on the city's broker, `<prefix>/+/up/#` is what the gateway
forwarded. Both sides verify every envelope against the fleet registry's public key,
as the city platform would, so a forged envelope is never counted as a reading.

A node's sequence numbers are contiguous within one boot (a reset jumps a reserved
block, and the boot count in the payload changes), so a seq missing between the
first and last seen of a (device, boot) is a reading that was produced but never
seen on the pole: it counts as produced, and as lost unless it arrives upstream.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from citynode import pole_broker, wire
from citynode.mosquitto import Mosquitto
from citynode.registry import Registry, RegistryError, load_registry
from citynode.subscriber import Subscriber

# SenML names (firmware/node) of the quantities the view shows, by column.
SHOWN = {"light/lux": "lux", "noise/laeq": "laeq", "air/pm2_5": "pm25",
         "env/temperature": "temp", "clock/step_ms": "clock", "lamp/level": "lamp"}
REGISTRY_RELOAD_S = 1.0

Key = tuple[str, int]  # (device, seq): never repeats for a device


@dataclass
class NodeState:
    """One node as the city sees it."""

    values: dict[str, float] = field(default_factory=dict)
    last_seen: float | None = None
    readings: int = 0
    events: int = 0
    lamp_source: str | None = None  # what set the lamp: a rule, an event, the operator


@dataclass(frozen=True)
class Impulse:
    """An impulse event as the city got it: its device, class, levels and onset."""

    device: str
    kind: str | None
    level_dba: float | None
    lzpeak_db: float | None
    onset_ms: int | None         # Unix ms, None if the node's clock had not synced

    @classmethod
    def of(cls, payload: wire.Payload) -> Impulse:
        got = {r.get(0): r.get(2, r.get(3)) for r in payload.records}
        return cls(payload.device, got.get("noise/class"), got.get("noise/impulse"),
                   got.get("noise/lzpeak"), payload.time_ms)


class Ledger:
    """Thread-safe tallies of both brokers' traffic; the paho threads write, the view reads."""

    def __init__(self, registry_dir: Path):
        self.registry_dir = registry_dir
        self._registry: Registry | None = None
        self._loaded_at = 0.0
        self.lock = threading.Lock()
        self._verify_lock = threading.Lock()  # the registry cache is shared by two threads
        self.seen: dict[tuple[str, int], set[int]] = {}  # (device, boot) -> seqs on the pole
        self.upstream: set[Key] = set()
        self.duplicates = 0
        self.local_invalid = 0      # failed verification on the pole (the forged one)
        self.upstream_invalid = 0   # failed verification at the city: must stay 0
        self.nodes: dict[str, NodeState] = {}
        self.last_envelope: tuple[str, bytes] | None = None
        self._impulses: list[Impulse] = []  # not shown yet

    # --- verification -----------------------------------------------------------------
    def verify(self, data: bytes) -> wire.Payload | None:
        """The payload if the envelope verifies against the registry, else None."""
        try:
            return wire.open_envelope(data, self._key_for)
        except (wire.EnvelopeError, RegistryError):
            return None

    def _key_for(self, kid: str, alg: str):
        with self._verify_lock:
            return self._current_registry(kid).key_for(kid, alg)

    def _current_registry(self, device: str) -> Registry:
        """The registry, re-read (at most once a second) when it lacks `device`, because
        nodes are registered while the demo runs."""
        registry = self._registry
        if registry is not None and registry.get(device) is not None:
            return registry
        if registry is None or time.monotonic() - self._loaded_at > REGISTRY_RELOAD_S:
            self._registry = load_registry(self.registry_dir)
            self._loaded_at = time.monotonic()
        return self._registry

    # --- the two feeds ------------------------------------------------------------------
    def on_pole(self, data: bytes) -> None:
        payload = self.verify(data)
        with self.lock:
            if payload is None:
                self.local_invalid += 1
                return
            self.seen.setdefault((payload.device, payload.boot), set()).add(payload.seq)
            self.last_envelope = (payload.device, data)

    def on_city(self, topic: str, data: bytes) -> None:
        payload = self.verify(data)
        with self.lock:
            if payload is None or not topic.endswith("/up/" + payload.device):
                self.upstream_invalid += 1
                return
            key = (payload.device, payload.seq)
            if key in self.upstream:  # resent after a reconnect: QoS 1 is at least once
                self.duplicates += 1
                return
            self.upstream.add(key)
            self._show(payload)

    def _show(self, payload: wire.Payload) -> None:
        node = self.nodes.setdefault(payload.device, NodeState())
        node.last_seen = time.time()
        if payload.kind == wire.KIND_EVENT:
            node.events += 1
            self._impulses.append(Impulse.of(payload))
            return
        node.readings += 1
        for record in payload.records:
            column = SHOWN.get(record.get(0))
            value = record.get(2)
            if column and isinstance(value, int | float) and not isinstance(value, bool):
                node.values[column] = float(value)
            if record.get(0) == "lamp/source" and isinstance(record.get(3), str):
                node.lamp_source = record[3]

    def take_impulses(self) -> list[Impulse]:
        """The impulse events that reached the city since the last call."""
        with self.lock:
            taken, self._impulses = self._impulses, []
        return taken

    # --- counts -------------------------------------------------------------------------
    def produced(self) -> set[Key]:
        """Every reading the nodes produced: seen on the pole, plus the gaps in each boot's
        sequence numbers."""
        with self.lock:
            return {(device, seq) for (device, _), seqs in self.seen.items()
                    for seq in range(min(seqs), max(seqs) + 1)}

    def verified(self) -> set[Key]:
        with self.lock:
            return set(self.upstream)

    def missing(self) -> set[Key]:
        """Produced but not (yet) verified at the city."""
        return self.produced() - self.verified()


def pole_watch(broker: Mosquitto, ledger: Ledger, secret: Path) -> Subscriber:
    """What the nodes publish on the pole's broker, through its read-only monitor account."""
    login = (pole_broker.MONITOR_USER, secret.read_text().strip())
    return Subscriber(broker.host, broker.port, wire.UP_PREFIX + "+", login=login,
                      on_message=lambda m: ledger.on_pole(m.payload))


def city_watch(broker: Mosquitto, prefix: str, ledger: Ledger) -> Subscriber:
    """The city: a persistent session on the city broker, so what the gateway sends while
    this subscriber reconnects (after the broker's restart) waits for it."""
    return Subscriber(broker.host, broker.port, f"{prefix}/+/up/#", client_id="demo-city",
                      persistent=True, on_message=lambda m: ledger.on_city(m.topic, m.payload))

"""The operator's view of the fleet through the city's broker, as the gateways publish it.

Which gateway a node is behind, and its site and pole, come from the gateways' retained
place packs (`<prefix>/<gateway>/meta/<device>`, citynode/place.py): no registry is
needed to address a command. A command goes to `<prefix>/<gateway>/down/<device>`;
the node's answer (a signed status envelope) comes back on `<prefix>/<gateway>/up/
<device>`, and is checked against the node's key when the registry is at hand.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from citynode import wire
from citynode.cli import CliError
from citynode.registry import Registry, RegistryError, load_registry

from .home import CitySettings, OpsError

CONNECT_S = 10.0
RETAINED_QUIET_S = 0.5      # the broker sends retained messages at once: then quiet


class CityUnreachable(CliError):
    kind = "city_broker"


@dataclass(frozen=True)
class Node:
    """A node as the city sees it: where it stands and which gateway relays to it."""

    device: str
    gateway: str
    site: str = ""
    pole: str = ""
    lat: float | None = None
    lon: float | None = None


@dataclass(frozen=True)
class Answer:
    """A status envelope of a node: its records by name, whether its signature checked."""

    device: str
    records: dict
    verified: bool
    at: float


def _place(topic: str, payload: bytes) -> Node | None:
    parts = topic.split("/")
    if len(parts) < 3 or parts[-2] != "meta" or not payload:
        return None                     # an empty retained message: the device left
    try:
        pack = json.loads(payload)
        fields = {r["n"]: r.get("v", r.get("vs")) for r in pack}
    except (ValueError, KeyError, TypeError):
        return None
    return Node(parts[-1], parts[-3], str(fields.get("site", "")), str(fields.get("pole", "")),
                fields.get("lat"), fields.get("lon"))


class CityLink:
    """One MQTT connection to the city's broker for one citynode-ops run."""

    def __init__(self, settings: CitySettings, client_id: str):
        self.settings = settings
        self.prefix = settings.topic_prefix.rstrip("/")
        self.registry = _registry(settings.registry_dir)
        self._places: dict[str, Node] = {}
        self._last_place = time.monotonic()
        self.answers: queue.Queue[Answer] = queue.Queue()
        self._subscribed = threading.Event()
        self._connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        if settings.tls:
            self.client.tls_set(ca_certs=settings.ca_file)
        if settings.username:
            self.client.username_pw_set(settings.username, _password(settings.password_file))
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        try:
            self.client.connect(settings.host, settings.port)
        except OSError as exc:
            raise CityUnreachable(f"cannot reach the city broker {settings.host}:"
                                  f"{settings.port} ({exc})",
                                  "check the network and [city] host/port in ops.toml") from None
        self.client.loop_start()
        if not self._connected.wait(CONNECT_S):
            self.close()
            raise CityUnreachable(f"the city broker {settings.host}:{settings.port} did not "
                                  f"accept the connection within {CONNECT_S:g} s",
                                  "check the login ([city] username, password_file) and TLS")

    def _on_connect(self, client, userdata, flags, reason, props) -> None:
        if reason.is_failure:
            return
        client.subscribe([(f"{self.prefix}/+/meta/+", 1), (f"{self.prefix}/+/up/+", 1)])
        self._connected.set()

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) >= 3 and parts[-2] == "meta":
            node = _place(msg.topic, bytes(msg.payload))
            if node is not None:
                self._places[node.device] = node
            else:
                self._places.pop(parts[-1], None)
            self._last_place = time.monotonic()
        elif len(parts) >= 3 and parts[-2] == "up" and not msg.retain:
            answer = self._answer(parts[-1], bytes(msg.payload))
            if answer is not None:
                self.answers.put(answer)

    def _answer(self, device: str, data: bytes) -> Answer | None:
        """A status envelope of `device`, verified if the registry is known; None for
        anything else (readings, events, garbage)."""
        try:
            envelope = wire.decode_envelope(data)
            body = wire.decode_payload(envelope)
        except wire.EnvelopeError:
            return None
        if body.kind != wire.KIND_STATUS or envelope.kid != device:
            return None
        verified = False
        if self.registry is not None:
            try:
                self.registry.verify(envelope)
                verified = True
            except wire.EnvelopeError as exc:
                if exc.reason != "unknown_device":  # a copy of the registry older than it
                    return None         # claims to be the node, is not: not its answer
        records = {r.get(0): r.get(2, r.get(3)) for r in body.records}
        return Answer(device, records, verified, time.monotonic())

    def fleet(self) -> dict[str, Node]:
        """Every node a gateway announces, by device id."""
        self._subscribed.wait(CONNECT_S)
        while time.monotonic() - self._last_place < RETAINED_QUIET_S:
            time.sleep(0.05)
        return dict(self._places)

    def send(self, node: Node, command: bytes) -> None:
        info = self.client.publish(f"{self.prefix}/{node.gateway}/down/{node.device}", command,
                                   qos=1)
        info.wait_for_publish(CONNECT_S)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _registry(directory: str | None) -> Registry | None:
    if not directory:
        return None
    try:
        return load_registry(Path(directory))
    except (OSError, RegistryError) as exc:
        raise OpsError(f"cannot read the registry {directory} ({exc})",
                       "fix [city] registry_dir in ops.toml, or remove it (answers are then "
                       "shown unverified)") from None


def _password(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise OpsError(f"cannot read the password file {path} ({exc.strerror})",
                       "fix [city] password_file in ops.toml") from None

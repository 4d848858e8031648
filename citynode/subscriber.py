"""A host-side MQTT subscriber: how the demo, the tests, the HIL suite and the benchmarks
watch a broker (the gateway's own connections live in citynode.gateway).

One paho client in its own network thread, subscribed at QoS 1. By default it keeps
every message as (topic, payload) in `messages`; `on_message` hands each Message on
instead. `persistent=True` is the city's
view: an MQTT 5 session that outlives a reconnect, so what is published while the
subscriber or its broker restarts waits for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from citynode import wire

SESSION_EXPIRY_S = 3600


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    user_properties: dict[str, str] = field(default_factory=dict)
    retain: bool = False
    at: float = 0.0  # time.monotonic() on arrival


class Subscriber:
    def __init__(self, host: str, port: int, topic: str = wire.UP_PREFIX + "#", *,
                 client_id: str = "",
                 login: tuple[str, str] | None = None,
                 persistent: bool = False,
                 on_message: Callable[[Message], None] | None = None,
                 timeout: float = 10.0):
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.on_message = on_message or self.keep  # settable: a test can wrap it
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"watch-{id(self):x}",
                                  protocol=mqtt.MQTTv5 if persistent else mqtt.MQTTv311)
        options = SubscribeOptions(qos=1, retainAsPublished=True) if persistent else None
        self.client.on_connect = lambda c, u, f, rc, p: (
            c.subscribe(topic, options=options) if options else c.subscribe(topic, qos=1))
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._arrived
        self.client.reconnect_delay_set(0.1, 1.0)
        if login is not None:  # (user, password): a locked broker (citynode.pole_broker)
            self.client.username_pw_set(*login)
        kwargs: dict = {}
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            kwargs = {"clean_start": False, "properties": props}
        try:
            self.client.connect(host, port, **kwargs)
        except OSError as exc:
            raise ConnectionError(f"cannot connect to the broker {host}:{port}: {exc}") from None
        self.client.loop_start()
        if not self._subscribed.wait(timeout):
            self.close()
            raise ConnectionError(f"no subscription to {topic!r} on {host}:{port} "
                                  f"within {timeout:g} s")

    def _arrived(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        props = dict(getattr(msg.properties, "UserProperty", []) or [])
        self.on_message(Message(msg.topic, bytes(msg.payload), props, bool(msg.retain),
                                 time.monotonic()))

    def keep(self, message: Message) -> None:
        with self.lock:
            self.messages.append((message.topic, message.payload))

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [payload for _, payload in self.messages]

    def wait_count(self, n: int, timeout: float = 30) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.payloads()
            if len(got) >= n:
                return got
            time.sleep(0.05)
        raise AssertionError(f"got {len(self.payloads())} of {n} messages in {timeout}s")

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

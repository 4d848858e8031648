"""The city's broker: buffered rows forwarded (MQTT 5, QoS 1), deleted on PUBACK.

One thread owns the upstream client and runs its network loop itself (`poll`), so
connection state, the in-flight table and the dispatch never race. Rows are keyed by
the store's row id (paho's mid restarts on every connection); on a reconnect everything
that was in flight is sent again, oldest first (the upstream may see a duplicate: the same
device and seq). Two lanes share a small in-flight window: live rows (stored since the
connection came up) first, then the backlog (what was buffered before, and backfill
from nodes' spools), rate limited, leaving slots free for live data, and marked
`historical=1`; each lane keeps per-device order (row id order), except that the
backlog's impulse events go before the rest of it (an event must not wait an outage's
worth of readings). Reconnects back off
exponentially with jitter. The retained `<prefix>/<gateway>/status` says online, and
the broker publishes the last will (offline) if the gateway vanishes. The retained
`<prefix>/<gateway>/meta/<device>` says where each node stands (citynode/place.py),
kept as the daemon's registry says (`set_places`).

What is in flight is held in the store (`Store.sending`), so it is neither evicted nor
merged into; PUBACKed rows go to the store, which deletes them inside its next group
commit (`Store.delete_later`). The same session receives operator commands on
`<prefix>/<gateway>/down/+` and hands them to `on_command` (the downlink relay).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from functools import lru_cache

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .config import Config, ConfigError, credential, read_credential
from .logs import RateLimitedLog
from .metrics import Metrics
from .mqttio import BufferedClient
from .store import Row, Store

log = logging.getLogger("citynode.gateway.city")

CONNACK_TIMEOUT_S = 15.0
DELETE_EVERY_S = 0.2  # acked rows wait this long for the pole link's commit to delete them
DELETE_BATCH = 512
QUERY_EVERY_S = 0.25  # look for rows this often even when nothing says there are new ones


class CityLink:
    """The upstream client, its thread, and the two lanes' dispatch."""

    def __init__(self, config: Config, store: Store, metrics: Metrics,
                 on_command: Callable[[str, bytes], None] | None = None):
        self.config, self.store, self.metrics = config, store, metrics
        self.up = config.upstream
        self.on_command = on_command  # None: no downlink relay, no subscription
        base = f"{self.up.topic_prefix}/{config.gateway_id}"
        self.up_topic, self.gap_topic = f"{base}/up/", f"{base}/gap/"
        self.down_topic, self.status_topic = f"{base}/down/", f"{base}/status"
        self.meta_topic = f"{base}/meta/"
        # Places: what the registry says (any thread sets it), what this gateway has
        # published upstream, and what an earlier connection may have left there.
        self._places_lock = threading.Lock()
        self._places: dict[str, bytes] = {}
        self._places_sent: dict[str, bytes] | None = None   # the dict last synced
        self._published_places: dict[str, bytes] = {}
        self._stale_places: set[str] = set()
        self.rlog = RateLimitedLog(log)
        self.connected = False
        self.heartbeat = time.monotonic()
        self._stop = threading.Event()
        self._drain_timeout = 3.0  # stop(): how long to wait for in-flight PUBACKs
        self._thread = threading.Thread(target=self._run, name="forward", daemon=True)
        # Connection: a fresh paho client per attempt, exponential backoff between them.
        self._connecting_since: float | None = None
        self._attempt = 0
        self._next_attempt = 0.0
        # In flight on this connection: mid -> (row id, historical), each row held in
        # the store (`Store.sending`) until its PUBACK deletes it or a reset releases it.
        self._mids: dict[int, tuple[int, bool]] = {}
        self._acked: list[int] = []  # PUBACKed this loop turn, handed to the store after it
        self._retry: list[int] = []  # refused by the upstream broker: sent again first
        self._more = False  # a PUBACK freed a slot: dispatch on the next turn
        self._last_query = 0.0
        # The lanes: rows up to `_boundary` are backlog; each lane walks by row id.
        self._boundary = self._live_cursor = self._hist_cursor = self._event_cursor = 0
        self._events_sent: set[int] = set()   # backlog events sent ahead on this connection
        self._tokens = 0.0  # the backlog's rate limit (token bucket)
        self._tokens_at = time.monotonic()
        self.client = self._make_client()

    def _make_client(self) -> BufferedClient:
        up = self.up
        client = BufferedClient(CallbackAPIVersion.VERSION2, client_id=up.client_id,
                                protocol=mqtt.MQTTv5)
        if up.tls:
            try:
                client.tls_set(ca_certs=str(up.ca_file) if up.ca_file else None,
                               certfile=str(up.cert_file) if up.cert_file else None,
                               keyfile=str(credential(up.key_file)) if up.key_file else None)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"upstream TLS files cannot be used: {exc}") from None
        if up.username:
            password = (read_credential(up.password_file, "upstream.password_file")
                        if up.password_file else None)
            client.username_pw_set(up.username, password)
        client.max_inflight_messages_set(max(up.inflight + 4, 20))
        client.max_queued_messages_set(0)
        client.will_set(self.status_topic, self._status("offline"), qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _status(self, state: str) -> bytes:
        return json.dumps({"gateway": self.config.gateway_id, "state": state,
                           "since": iso(time.time())}).encode()

    # --- thread -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Wait (bounded) for in-flight PUBACKs, delete them, say offline, disconnect."""
        self._drain_timeout = timeout
        self._stop.set()
        self._thread.join(timeout + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = now = time.monotonic()
            if not self.connected and self._connecting_since is None:
                if now < self._next_attempt:
                    self._stop.wait(min(0.05, self._next_attempt - now))
                    continue
                self._connect()
                if self._connecting_since is None:
                    self._next_attempt = time.monotonic() + self._backoff()
                    continue
            rc = self.client.poll(0.01)
            if rc != mqtt.MQTT_ERR_SUCCESS and (self.connected or self._connecting_since):
                self._lost(f"network loop: {mqtt.error_string(rc)}")
            elif (self._connecting_since is not None
                  and now - self._connecting_since > CONNACK_TIMEOUT_S):
                self._lost("no CONNACK")
                self.client.disconnect()
            if self.connected:
                self._sync_places()
            if self.connected and (self._more or self.store.new_rows.is_set()
                                   or now - self._last_query > QUERY_EVERY_S):
                self._last_query = now
                self._dispatch()
            self._flush_deletes()
        self._shutdown()

    def _backoff(self) -> float:
        """The next attempt's delay (counts the attempt): exponential, with jitter."""
        self._attempt += 1
        ceiling = min(self.up.backoff_max_s, self.up.backoff_min_s * 2 ** (self._attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    def _connect(self) -> None:
        # A fresh client per connection: no in-flight state of paho's survives a reconnect;
        # what was not acknowledged is still in the store and goes out again.
        old = self.client.socket()
        if old is not None:
            old.close()
        self.client = self._make_client()
        try:
            self.client.connect(self.up.host, self.up.port, keepalive=self.up.keepalive,
                                clean_start=True)
        except (OSError, ValueError) as exc:
            self.rlog.warning("connect", "upstream %s:%d unreachable: %s", self.up.host,
                              self.up.port, exc)
            return
        self._connecting_since = time.monotonic()

    def _lost(self, why: str) -> None:
        if self.connected:
            log.warning("upstream connection lost (%s); buffering, reconnecting with backoff", why)
        self._disconnected()

    def _disconnected(self) -> None:
        if self.connected or self._connecting_since is not None:
            self._next_attempt = time.monotonic() + self._backoff()
        self.connected, self._connecting_since = False, None
        self.metrics.set("uplink_up", 0)
        self._reset_inflight()

    def _reset_inflight(self) -> None:
        """What was in flight is void: the store no longer holds it; it goes out again."""
        self.store.release([row_id for row_id, _ in self._mids.values()])
        self._mids.clear()
        self.metrics.set("inflight", 0)

    # --- callbacks (this thread, inside client.poll) ----------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connecting_since = None
        if reason_code.is_failure:
            self.rlog.warning("connack", "upstream refused the connection: %s", reason_code)
            self._next_attempt = time.monotonic() + self._backoff()
            return
        self.connected, self._attempt = True, 0
        self.metrics.set("uplink_up", 1)
        self.metrics.inc("uplink_connects_total")
        self._reset_inflight()
        self._flush_deletes(force=True)
        # What is buffered now is the backlog (sent as historical, in its own lane);
        # what arrives from now on is live. Both lanes start over: anything that was in
        # flight on the last connection goes out again.
        self._boundary = self.store.max_id()
        self._live_cursor = self._hist_cursor = self._event_cursor = 0
        self._events_sent = set()
        self._retry = []
        client.publish(self.status_topic, self._status("online"), qos=1, retain=True)
        # every place again: the city's broker may have lost what it retained
        self._stale_places |= set(self._published_places)
        self._published_places, self._places_sent = {}, None
        if self.on_command is not None:
            client.subscribe(self.down_topic + "+", qos=1)
        log.info("connected upstream to %s:%d; %d rows buffered", self.up.host, self.up.port,
                 self.store.stats()["rows"])

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._disconnected()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        entry = self._mids.pop(mid, None)
        if entry is None:
            return  # the status message
        row_id, historical = entry
        if reason_code.is_failure:
            self._retry.append(row_id)  # still held in the store: it goes out again
            self.metrics.inc("forward_failed_total")
            self.rlog.warning("puback", "upstream refused row %d: %s; will retry", row_id,
                              reason_code)
            return
        self._acked.append(row_id)
        self.metrics.inc("forwarded_total", lane="backlog" if historical else "live")
        self._more = True

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        if self.on_command is not None:
            self.on_command(message.topic[len(self.down_topic):], message.payload)

    # --- places -----------------------------------------------------------------------------

    def set_places(self, places: dict[str, bytes]) -> None:
        """The registry's places now (citynode.place.places); sent on the next turn."""
        with self._places_lock:
            self._places = places

    def _sync_places(self) -> None:
        with self._places_lock:
            want = self._places
        if want is self._places_sent:
            return
        for device, pack in want.items():
            if self._published_places.get(device) != pack:
                self._publish_place(device, pack)
        for device in (set(self._published_places) | self._stale_places) - set(want):
            self._publish_place(device, b"")         # revoked or gone: cleared
        self._stale_places = set()
        self._places_sent = want

    def _publish_place(self, device: str, pack: bytes) -> None:
        info = self.client.publish(self.meta_topic + device, pack, qos=1, retain=True)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return  # the connection went: the next one publishes every place again
        if pack:
            self._published_places[device] = pack
        else:
            self._published_places.pop(device, None)

    # --- dispatch ---------------------------------------------------------------------------

    def _dispatch(self) -> None:
        free = self.up.inflight - len(self._mids)
        if free <= 0:
            return
        self._more = False
        self.store.new_rows.clear()
        if self._retry:
            retry, self._retry = self._retry[:free], self._retry[free:]
            free -= self._publish(self.store.rows(retry), historical=True)
        rows = self.store.live_rows(self._live_cursor, self._boundary, free)
        sent = self._publish(rows, historical=False)
        if sent:
            self._live_cursor = rows[sent - 1].id
        free -= sent
        if sent < len(rows) or free <= 0:
            return
        events = self.store.backlog_events(self._event_cursor, self._boundary, free)
        sent = self._publish(events, historical=True)
        if sent:
            self._event_cursor = events[sent - 1].id
            self._events_sent.update(row.id for row in events[:sent])
        free -= sent
        if sent < len(events) or free <= 0:
            return
        self._dispatch_backlog(free)

    def _dispatch_backlog(self, free: int) -> None:
        """Backlog rows within the rate limit, leaving slots for live data (and without
        the events already sent ahead)."""
        mono = time.monotonic()
        reserve = max(1, self.up.inflight // 4)  # slots the backlog leaves for live data
        rate = self.up.backlog_max_per_s
        self._tokens = min(rate, self._tokens + (mono - self._tokens_at) * rate)
        self._tokens_at = mono
        budget = min(free - (reserve if len(self._mids) >= reserve else 0), int(self._tokens))
        if budget > 0:
            walked = self.store.backlog_rows(self._hist_cursor, self._boundary, budget)
            backlog = [row for row in walked if row.id not in self._events_sent]
            sent = self._publish(backlog, historical=True)
            if sent == len(backlog) and walked:
                self._hist_cursor = walked[-1].id
            elif sent:
                self._hist_cursor = backlog[sent - 1].id
            self._tokens -= sent

    def _publish(self, rows: list[Row], historical: bool) -> int:
        with self.client.corked():  # one write for the batch
            sent = self._publish_rows(rows, historical)
        self.metrics.set("inflight", len(self._mids))
        return sent

    def _publish_rows(self, rows: list[Row], historical: bool) -> int:
        sent = 0
        flag = "1" if historical else "0"
        head = user_property("gateway", self.config.gateway_id)
        tail = user_property("historical", flag)
        for row in rows:
            stamp = iso(row.received_at)
            props = UserProperties([("gateway", self.config.gateway_id), ("received_at", stamp),
                                    ("historical", flag)],
                                   head + user_property("received_at", stamp) + tail)
            topic = (self.gap_topic if row.is_gap else self.up_topic) + row.device
            info = self.client.publish(topic, row.data, qos=1, properties=props)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break  # connection went away; the rows stay buffered
            self._mids[info.mid] = (row.id, historical)
            self.store.sending((row.id,))
            sent += 1
        return sent

    def _flush_deletes(self, force: bool = False) -> None:
        """Hand PUBACKed rows to the store, which deletes them with the next group commit
        (no fsync of their own); delete them here only when no commit came for a while."""
        if self._acked:
            self.store.delete_later(self._acked)
            self._acked = []
        pending = self.store.pending_deletes()
        if pending and (force or pending >= DELETE_BATCH):
            self.store.flush_deletes()
        elif pending:
            self.store.flush_deletes(older_than_s=DELETE_EVERY_S)

    def _shutdown(self) -> None:
        deadline = time.monotonic() + self._drain_timeout
        while self.connected and self._mids and time.monotonic() < deadline:
            self.client.poll(0.05)
        self._flush_deletes(force=True)
        if self.connected:
            info = self.client.publish(self.status_topic, self._status("offline"), qos=1,
                                       retain=True)
            end = time.monotonic() + 1.0
            while not info.is_published() and time.monotonic() < end and self.connected:
                self.client.poll(0.05)
            self.client.disconnect()
            self.client.poll(0.05)
        self.connected = False
        self.metrics.set("uplink_up", 0)


# --- the PUBLISH's user properties, encoded once (the benchmark's relay uses them too) --------

class UserProperties(Properties):
    """PUBLISH properties made of user properties only, encoded once here.

    paho's generic Properties encoder costs more than the rest of a publish; paho only
    calls `pack()` on what it is given, so this packs the MQTT 5 property block itself
    (identifier 0x26, two length-prefixed UTF-8 strings per pair).
    """

    def __init__(self, pairs: list[tuple[str, str]], body: bytes | None = None):
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "pairs", pairs)
        if body is None:
            body = b"".join(user_property(k, v) for k, v in pairs)
        object.__setattr__(self, "_packed", _varint(len(body)) + body)

    def pack(self) -> bytes:
        return self._packed

    def __str__(self) -> str:
        return f"UserProperties({self.pairs})"


def user_property(key: str, value: str) -> bytes:
    return b"\x26" + _utf8(key) + _utf8(value)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = n >> 7, n & 0x7F
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def iso(ts: float) -> str:
    """UTC ISO 8601 with milliseconds, as datetime rounds; runs once per forwarded row,
    so the seconds part is cached."""
    seconds = int(ts)
    micros = round((ts - seconds) * 1e6)
    if micros >= 1_000_000:
        seconds, micros = seconds + 1, micros - 1_000_000
    return _iso_second(seconds) + f".{micros // 1000:03d}Z"


@lru_cache(maxsize=256)
def _iso_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))

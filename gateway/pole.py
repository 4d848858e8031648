"""The pole's broker: the nodes' envelopes, verified, committed, then acknowledged.

The subscription is QoS 1 on a persistent session (MQTT 3.1.1, clean_session=False:
measured 1.6x faster through Mosquitto than MQTT 5 here) with manual acks: a PUBACK goes to
the broker only after the envelope's group commit, so a crash at any point leaves the
envelope either in the store or still queued in the broker (redelivered, deduped by
the store's replay window). Rejected envelopes are acknowledged too (in order, after
the same commit), counted by reason and logged at most once per interval per reason.

The same session publishes downlinks to the nodes (`publish`, for the downlink relay).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from citynode import wire
from citynode.registry import Registry

from . import unverified
from .buckets import Buckets
from .config import Config, read_credential
from .logs import RateLimitedLog
from .metrics import Metrics
from .mqttio import BufferedClient
from .store import DROPPED, DUPLICATE, REPLAYED, STORED, Incoming, Store
from .unverified import Unverified

log = logging.getLogger("citynode.gateway.pole")

# what a store insert raises for an item's values, not for the disk or the database: a
# verified envelope should never get there (wire bounds its integers), but if one does,
# it is that envelope's problem alone (sqlite3.OperationalError, a full or broken disk,
# stays the daemon's)
UNSTORABLE = (OverflowError, ValueError, TypeError, sqlite3.InterfaceError,
              sqlite3.IntegrityError)


class Verifier:
    """Open one envelope against the registry; raise wire.EnvelopeError with a reason."""

    def __init__(self, registry: Callable[[], Registry], max_bytes: int = wire.MAX_ENVELOPE_BYTES):
        self.registry = registry
        self.max_bytes = max_bytes

    def check(self, topic: str, data: bytes, received_at: float) -> Incoming:
        envelope = wire.decode_envelope(data, self.max_bytes)
        key = self.registry().verify(envelope)     # during a rollover: either of two keys
        payload = wire.decode_payload(envelope)
        if topic != wire.up_topic(payload.device):
            raise wire.EnvelopeError("malformed", f"{payload.device} published on {topic!r}, "
                                     f"expected {wire.up_topic(payload.device)}")
        return Incoming(payload.device, payload.seq, data, received_at,
                        event=payload.kind == wire.KIND_EVENT,
                        node_time=None if payload.time_ms is None else payload.time_ms / 1000,
                        key=key)


@dataclass(frozen=True)
class Later:
    """An envelope the registry cannot check yet (gateway/unverified.py)."""

    topic: str
    data: bytes
    received_at: float

    @property
    def device(self) -> str:  # the broker's ACL lets a node publish only on its own topic
        return self.topic.removeprefix(wire.UP_PREFIX)


@dataclass
class _Pending:
    """A received message waiting for the group commit; `item` is None when rejected."""

    item: Incoming | Later | None
    mid: int
    qos: int
    generation: int


class PoleLink:
    """The pole broker's client (paho's thread) and the group-commit writer thread."""

    def __init__(self, config: Config, store: Store, registry: Callable[[], Registry],
                 metrics: Metrics):
        self.config, self.store, self.metrics = config, store, metrics
        self.verifier = Verifier(registry)
        self.unverified = Unverified(store.path)
        self.rlog = RateLimitedLog(log)
        self.budget = Buckets(config.local.device_burst, config.local.device_rate_per_s)
        # The paho thread appends here and wakes the writer only for a batch's first
        # row or a full batch: a wake-up per message costs more than the verify.
        self._inbox: list[_Pending] = []
        self._ready = threading.Condition()
        self._last_arrival = 0.0
        self.connected = False
        self.subscribed = False      # the broker took our subscription (SUBACK)
        self.down_since: float | None = time.monotonic()
        self.heartbeat = time.monotonic()
        self.failed: str | None = None  # set when a commit failed: the daemon exits
        self._generation = 0  # per connection: acks only go to the session that sent
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer",
                                        daemon=True)
        self.client = self._make_client()

    def _make_client(self) -> BufferedClient:
        local = self.config.local
        client = BufferedClient(CallbackAPIVersion.VERSION2, client_id=local.client_id,
                                protocol=mqtt.MQTTv311, clean_session=False, manual_ack=True)
        if local.username:
            password = (read_credential(local.password_file, "local.password_file")
                        if local.password_file else None)
            client.username_pw_set(local.username, password)
        client.reconnect_delay_set(1, 10)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def start(self) -> None:
        self._writer.start()
        self.client.connect_async(self.config.local.host, self.config.local.port, keepalive=30)
        self.client.loop_start()

    # --- MQTT callbacks (paho's network thread) ---------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("local broker refused the connection: %s", reason_code)
            return
        self._generation += 1
        self.connected, self.down_since = True, None
        self.subscribed = False
        self.metrics.set("local_up", 1)
        client.subscribe(wire.UP_PREFIX + "+", qos=1)
        log.info("connected to the local broker %s:%d (session present: %s)",
                 self.config.local.host, self.config.local.port, flags.session_present)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        """The broker took the subscription: from now on the nodes' envelopes come here
        (before it, on a first start, what they publish has no subscriber)."""
        self.subscribed = not any(code.is_failure for code in reason_codes)
        if not self.subscribed:
            log.error("the local broker refused the subscription to %s+: %s (its ACL)",
                      wire.UP_PREFIX, reason_codes)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected:
            log.warning("lost the local broker (%s); paho reconnects", reason_code)
        self.connected = self.subscribed = False
        self.down_since = self.down_since or time.monotonic()
        self.metrics.set("local_up", 0)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        received_at = time.time()
        self.metrics.inc("received_total")
        item = self.handle(message.topic, message.payload, received_at)
        pending = _Pending(item, message.mid, message.qos, self._generation)
        with self._ready:
            self._inbox.append(pending)
            self._last_arrival = time.monotonic()
            if len(self._inbox) == 1 or len(self._inbox) == self.config.store.commit_rows:
                self._ready.notify()

    def handle(self, topic: str, data: bytes, received_at: float) -> Incoming | Later | None:
        """Verify one envelope; Later when the registry cannot tell yet; None (counted and
        logged) when it is rejected. Never raises."""
        if not self.budget.take(topic):
            # before any work: the broker's ACL makes the topic its publisher's own, so a
            # node flooding its topic spends its own budget and costs the others nothing
            local = self.config.local
            self.reject("rate_limited", f"{topic}: more than {local.device_burst} envelopes, "
                        f"then {local.device_rate_per_s:g}/s (local.device_burst, "
                        "local.device_rate_per_s); a node sending this much is broken or "
                        "hostile: revoke it")
            return None
        try:
            item = self.verifier.check(topic, data, received_at)
        except wire.EnvelopeError as exc:
            if exc.reason in unverified.REASONS and topic.startswith(wire.UP_PREFIX):
                self.metrics.inc("unverified_total", reason=exc.reason)
                self.rlog.warning(f"later-{exc.reason}", "kept until the registry can check "
                                  "it (%s): %s", exc.reason, exc)
                return Later(topic, bytes(data), received_at)
            self.reject(exc.reason, str(exc))
            return None
        except Exception as exc:  # a decoder bug must not take the ingest down
            log.exception("unexpected error verifying a message on %r", topic)
            self.reject("internal_error", f"{exc.__class__.__name__}")
            return None
        self.metrics.inc("verified_total")
        return item

    def reject(self, reason: str, detail: str) -> None:
        self.metrics.inc("rejected_total", reason=reason)
        self.rlog.warning(reason, "rejected (%s): %s", reason, detail)

    # --- group commit (writer thread) --------------------------------------------------------

    def _write_loop(self) -> None:
        while not self._stop.is_set():  # stop(): the rest is committed by drain()
            self.heartbeat = time.monotonic()
            batch = self._next_batch()
            if not batch:
                continue
            try:
                self.commit(batch)
            except Exception as exc:  # the daemon sees `failed` and exits non-zero
                log.exception("store commit failed; nothing of this batch was acknowledged")
                self.failed = f"store commit failed: {exc}"
                return

    def _next_batch(self) -> list[_Pending]:
        """Group commit: up to commit_rows, at most commit_ms after the first row, or
        sooner when nothing arrived for commit_idle_ms (the broker is waiting for our
        acks: its in-flight window is full, or traffic is light)."""
        limits = self.config.store
        with self._ready:
            if not self._inbox and not self._ready.wait(0.5):
                return []
            deadline = time.monotonic() + limits.commit_ms / 1000
            idle = limits.commit_idle_ms / 1000
            while len(self._inbox) < limits.commit_rows and not self._stop.is_set():
                now = time.monotonic()
                wait = min(deadline, self._last_arrival + idle) - now
                if wait <= 0:
                    break
                self._ready.wait(wait)
            batch = self._inbox[:limits.commit_rows]
            del self._inbox[:limits.commit_rows]
            return batch

    def commit(self, batch: list[_Pending]) -> None:
        """Store the batch in one transaction, then acknowledge all of it to the broker."""
        later = [p.item for p in batch if isinstance(p.item, Later)]
        if later:
            self._keep(later)
        items = [p.item for p in batch if isinstance(p.item, Incoming)]
        if items:
            try:
                self.store.insert(items)  # raises on a store failure: nothing is acked
            except UNSTORABLE:
                items = self._insert_one_by_one(batch)
            self.metrics.inc("commits_total")
            self.metrics.inc("stored_total", self._count_outcomes(items))
        for pending in batch:
            if pending.qos > 0 and pending.generation == self._generation and self.connected:
                self.client.ack(pending.mid, pending.qos)
        self.heartbeat = time.monotonic()

    def _keep(self, later: list[Later]) -> None:
        dropped = self.unverified.keep([(x.device, x.topic, x.data, x.received_at)
                                        for x in later])
        if dropped:
            self.reject("unverified_full", f"{dropped} unverified envelope(s), the oldest, "
                        "dropped to stay within the bounds")
        self.metrics.set("unverified_messages", self.unverified.count())

    def retry_unverified(self) -> int:
        """After a registry reload: check the kept envelopes again; store those that now
        verify, reject those that turn out bad, keep the rest. Returns how many were stored."""
        expired = self.unverified.expire()
        if expired:
            self.reject("unverified_expired", f"{expired} envelope(s) the registry never "
                        "learned to check")
        items, done = [], []
        for entry in self.unverified.waiting():
            try:
                items.append(self.verifier.check(entry.topic, entry.data, entry.received_at))
            except wire.EnvelopeError as exc:
                if exc.reason in unverified.REASONS:
                    continue  # the registry still cannot tell: it stays
                self.reject(exc.reason, str(exc))
            done.append(entry.id)
        stored = 0
        if items:
            self.store.insert(items)
            stored = self._count_outcomes(items)
            self.metrics.inc("stored_total", stored)
        self.unverified.forget(done)  # after the store's commit: a crash keeps them here
        self.metrics.set("unverified_messages", self.unverified.count())
        if done:
            log.info("registry reload: %d kept envelope(s) checked again, %d stored",
                     len(done), stored)
        return stored

    def _insert_one_by_one(self, batch: list[_Pending]) -> list[Incoming]:
        """A batch the store refused for what one item holds (its values, not the disk):
        each item alone, the one that fails again rejected, so that it cannot take the
        others, or the daemon, down with it (a node signs what it likes). Returns the
        items stored."""
        stored, refused = [], []
        for pending in batch:
            if not isinstance(pending.item, Incoming):
                continue
            try:
                self.store.insert([pending.item])
                stored.append(pending.item)
            except UNSTORABLE as exc:
                refused.append((pending, exc))
        if not stored and len(refused) > 1:  # not one item's fault: the store's, ack nothing
            raise refused[-1][1]
        for pending, exc in refused:
            log.error("the store refused %s seq %s (%r); rejected", pending.item.device,
                      pending.item.seq, exc)
            self.reject("internal_error", f"{pending.item.device} seq {pending.item.seq}: "
                        f"{exc.__class__.__name__}")
            pending.item = None
        return stored

    def _count_outcomes(self, items: list[Incoming]) -> int:
        """Report duplicates and replays as rejects; returns how many were stored."""
        stored = 0
        for item in items:
            if item.outcome == STORED:
                stored += 1
            elif item.outcome in (DUPLICATE, REPLAYED):
                self.reject(item.outcome, f"{item.device} seq {item.seq} "
                            + ("was already received" if item.outcome == DUPLICATE
                               else "is older than the replay window"))
            elif item.outcome == DROPPED:
                pass  # counted by the store's on_drop, reported as a gap record
        return stored

    def drain(self) -> None:
        """Commit and acknowledge whatever is queued (for shutdown)."""
        with self._ready:
            batch, self._inbox = self._inbox, []
        if batch:
            self.commit(batch)

    # --- downlink, shutdown ------------------------------------------------------------------

    def publish(self, topic: str, data: bytes) -> bool:
        """Publish to the nodes at QoS 1; False when paho could not take it (broker down)."""
        info = self.client.publish(topic, data, qos=1)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def stop(self) -> None:
        """Stop taking messages, commit and ack what is queued, then disconnect."""
        self._stop.set()
        with self._ready:
            self._ready.notify_all()
        self._writer.join(timeout=5)
        self.drain()
        time.sleep(0.1)  # let the network thread write the last PUBACKs
        self.client.disconnect()
        self.client.loop_stop()

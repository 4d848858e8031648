"""Uplink: every envelope to `citynode/up/<device>` at QoS 1, in order, none lost.

Every envelope goes through the spool (node.spool), and one publisher task sends
the spool's oldest record (or send() writes it, when the publisher is idle), waits
for its PUBACK, and only then pops it. So order per device is the queue's order, a
reconnect drains what was spooled before anything newer, and a lost PUBACK means
the same bytes go again (the gateway dedupes on seq) instead of a gap. One message in flight is
plenty for one window a minute and keeps that reasoning simple.

RAM records older than flush_ms go to flash (while offline, or behind a
backlog), so a power cut loses at most the last flush_ms of envelopes.
Downlink payloads on `citynode/down/<device>` go to on_downlink(payload); a
coroutine it returns is run as a task. Reconnects back off with jitter.
"""

import asyncio
import sys
import time

from node.backoff import Backoff
from node.doorbell import Doorbell
from node.mqtt import Client, MQTTError, SubscribeRefused
from node.spool import EVENT, ROUTINE, Spool

DEFAULTS = {
    "keepalive": 60,          # s
    "timeout_ms": 10000,      # TCP connect, CONNACK, SUBACK, socket writes
    "ack_timeout_ms": 10000,  # PUBACK; then the connection is dropped and re-made
    "backoff_min_ms": 1000,
    "backoff_max_ms": 60000,
    "clean": False,           # keep the session: downlink commands wait for us at the broker
    "user": None,
    "password": None,
    "will": None,             # (topic, message, qos, retain)
    "max_packet": 8192,
    "spool_dir": "/data/spool",
    "ram_count": 16,
    "ram_bytes": 8192,
    "flash_bytes": 65536,
    "head_every": 16,
    "flush_ms": 30000,        # offline: RAM records older than this go to flash
}

__all__ = ("Uplink", "DEFAULTS", "ROUTINE", "EVENT")


class Uplink:
    """Counters: published, spooled, failed, rejected, reconnects, downlinks; .last_error;
    dropped (by the full spool); stats() has them all for node health."""

    def __init__(self, device_id, host, port=1883, config=None, *, on_downlink=None, wifi=None,
                 spool=None):
        cfg = dict(DEFAULTS)
        if config:
            for key in config:
                if key not in DEFAULTS:
                    raise ValueError("unknown uplink setting %r" % key)
                cfg[key] = config[key]
        self.topic = "citynode/up/" + device_id
        self.down_topic = "citynode/down/" + device_id
        self.ack_timeout_ms = cfg["ack_timeout_ms"]
        self.flush_ms = cfg["flush_ms"]
        self.on_downlink = on_downlink
        self.wifi = wifi
        self.spool = spool or Spool(cfg["spool_dir"], ram_count=cfg["ram_count"],
                                    ram_bytes=cfg["ram_bytes"], flash_bytes=cfg["flash_bytes"],
                                    head_every=cfg["head_every"])
        self.client = Client(device_id, host, port, user=cfg["user"], password=cfg["password"],
                             keepalive=cfg["keepalive"], clean=cfg["clean"], will=cfg["will"],
                             max_packet=cfg["max_packet"], timeout_ms=cfg["timeout_ms"],
                             on_message=self._on_message)
        self.backoff = Backoff(cfg["backoff_min_ms"], cfg["backoff_max_ms"])
        self.published = 0
        self.spooled = 0
        self.failed = 0
        self.reconnects = 0
        self.downlinks = 0
        self.rejected = 0
        self.last_error = None
        self._connects = 0
        self._bell = Doorbell()
        self._task = None
        self._idle = False      # the publisher waits for a record: send() may write it itself
        self._written = None    # (record, what acked() waits on) send() wrote; True while writing

    # --- the app's side -----------------------------------------------------------------
    async def send(self, envelope, priority=ROUTINE):
        """Queue an envelope (bytes); it goes out after everything queued before it.

        If the publisher is idle, the caller's task writes it now: woken instead, the
        publisher would run only after every task already waiting for the loop (~40 ms
        of an impulse's 250 at chip speed). The publisher still waits for its PUBACK."""
        if not self.client.connected:
            self.spooled += 1
        self.spool.put(envelope, priority)
        if self._idle and self.client.connected:
            await self._write_now()
        self._bell.ring()

    async def _write_now(self):
        self._idle = False
        self._written = True
        data = self.spool.peek()
        try:
            self._written = (data, await self.client.send_publish(self.topic, data, 1))
        except Exception:  # the publisher tries it itself, and handles what went wrong
            self._written = None

    @property
    def connected(self):
        return self.client.connected

    @property
    def dropped(self):
        return self.spool.dropped

    def stats(self):
        """Counters for node health."""
        s = self.spool
        return {"connected": self.client.connected, "published": self.published,
                "spooled": self.spooled, "failed": self.failed, "dropped": s.dropped,
                "reconnects": self.reconnects, "downlinks": self.downlinks,
                "rejected": self.rejected,
                "depth": len(s), "depth_bytes": s.bytes_used(), "flash_writes": s.writes,
                "torn": s.torn, "last_error": self.last_error}

    def start(self):
        """run() as an asyncio task; returns the task."""
        self._task = asyncio.create_task(self.run())
        return self._task

    async def stop(self):
        """Stop publishing, save the spool to flash, say DISCONNECT."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.spool.flush()
        await self.client.disconnect()

    # --- the publisher ------------------------------------------------------------------
    async def run(self):
        """Connect, drain the spool, publish as envelopes come; forever."""
        while True:
            try:
                if await self._connect():
                    await self._pump()
                    self.spool.flush()  # link lost: RAM to flash now, head saved
            except Exception as e:  # nothing (MemoryError included) may end the uplink
                sys.print_exception(e)
                self._error(e)
                self.client.close()
                await self._offline(1000)

    async def _connect(self):
        if self.wifi is not None and not self.wifi.isconnected():
            await self._offline(500)
            return False
        try:
            await self.client.connect()
            try:
                await self.client.subscribe(self.down_topic, 1)
            except SubscribeRefused as e:  # no downlink is no reason to stop the uplink
                self._error(e)
        except (MQTTError, OSError) as e:
            self._error(e)
            self.client.close()
            await self._offline(self.backoff.next_ms())
            return False
        self.backoff.reset()
        self._connects += 1
        if self._connects > 1:
            self.reconnects += 1
        return True

    async def _pump(self):
        """Publish the oldest record until the connection ends."""
        client = self.client
        spool = self.spool
        self._written = None    # a new connection: nothing of the last one is in flight
        while client.connected:
            spool.flush(self.flush_ms)  # a long backlog: new records wait in flash, not RAM
            written = self._written
            if written is True:  # send() is still writing a record: it rings when done
                await self._bell.wait(1000)
                continue
            # what send() wrote is on the wire already, ahead of anything queued since
            data = written[0] if written else spool.peek()
            if data is None:
                self._idle = True
                try:
                    await self._bell.wait(1000)
                finally:
                    self._idle = False
                continue
            self._written = None
            try:
                if written:
                    await client.acked(written[1], self.ack_timeout_ms)
                else:
                    await client.publish(self.topic, data, 1, False, self.ack_timeout_ms)
                self.published += 1
            except MQTTError as e:
                self.failed += 1
                self._error(e)
                client.close()  # a fresh connection, then the same record again
                return
            except ValueError as e:  # can never go (too big for max_packet): not forever
                self._error(e)
                self.rejected += 1
            spool.sent(data)

    async def _offline(self, ms):
        """Wait ms (less if Wi-Fi comes back), flushing old RAM records to flash."""
        start = time.ticks_ms()
        while True:
            self.spool.flush(self.flush_ms)
            left = ms - time.ticks_diff(time.ticks_ms(), start)
            if left <= 0:
                return
            if self.wifi is not None and not self.wifi.isconnected():
                if await self.wifi.wait_connected(min(left, 250)):
                    return
            else:
                await asyncio.sleep_ms(min(left, 250))

    def _error(self, e):
        text = str(e) or type(e).__name__
        if text != self.last_error:  # one console line per new problem, not per retry
            print("uplink:", text)
        self.last_error = text

    def _on_message(self, topic, payload, retained):
        if topic != self.down_topic or self.on_downlink is None:
            return
        self.downlinks += 1
        result = self.on_downlink(payload)
        if hasattr(result, "send"):  # a coroutine: run it without holding up the reader
            asyncio.create_task(result)

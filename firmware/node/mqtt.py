"""MQTT 3.1.1 client on MicroPython asyncio streams, written from the OASIS spec.

One reader task owns the socket's input: it matches CONNACK, PUBACK, SUBACK and
PINGRESP to whoever waits for them and hands PUBLISH to `on_message(topic,
payload, retained)`, acking QoS 1 after the callback returns. Writers share a
lock so packets never interleave. A socket error, EOF, stalled write or missed
PINGRESP ends the connection once: every waiter wakes with ConnectionLost,
`.error` says why, and the owner calls connect() again (with backoff).

Packets are bounded both ways by `max_packet`: the node never allocates what a
peer announces. An oversized incoming PUBLISH is read in small pieces, acked,
dropped and counted (`.oversize`), so a poison message cannot loop forever.
"""

import asyncio
import struct
import time

from node.doorbell import Doorbell

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
SUBSCRIBE = 8
SUBACK = 9
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
JOIN_MAX = 1024

# 4 and 5: the pole broker does not know this node's password (a registry it has not
# reloaded, a node provisioned for another pole) or the node has none.
FIX_LOGIN = " (re-run citynode-provision, then reload the pole's gateway)"
REFUSED = {1: "unacceptable protocol version", 2: "client identifier rejected",
           3: "server unavailable", 4: "bad user name or password" + FIX_LOGIN,
           5: "not authorized" + FIX_LOGIN}


class MQTTError(Exception):
    """Base class of every error this client raises."""


class ConnectRefused(MQTTError):
    """CONNACK with a non-zero return code; `.code` is that code."""

    def __init__(self, code):
        super().__init__("broker refused the connection: %s (CONNACK code %d)"
                         % (REFUSED.get(code, "unknown reason"), code))
        self.code = code


class ConnectionLost(MQTTError):
    """No usable connection: never opened, closed by the broker, reset, or closed by us."""


class Timeout(MQTTError):
    """The broker did not answer in time (the connection may still be up)."""


class SubscribeRefused(MQTTError):
    """SUBACK 0x80: the broker (e.g. its ACL) does not let us subscribe to that filter."""


class ProtocolError(MQTTError):
    """The broker sent something MQTT 3.1.1 does not allow here."""


def _varlen(n):
    """Remaining Length (spec 2.2.3): 7 bits per byte, high bit = more, at most 4 bytes."""
    if n < 0 or n > 268435455:
        raise ValueError("remaining length out of range: %d" % n)
    out = bytearray()
    while True:
        digit = n & 0x7F
        n >>= 7
        out.append(digit | 0x80 if n else digit)
        if not n:
            return bytes(out)


def _str(s):
    """UTF-8 string or binary data with its 2-byte length prefix (spec 1.5.3)."""
    b = s.encode() if isinstance(s, str) else bytes(s)
    if len(b) > 65535:
        raise ValueError("string longer than 65535 bytes")
    return struct.pack("!H", len(b)) + b


def _why(err):
    if isinstance(err, MQTTError):
        return str(err)
    if isinstance(err, EOFError):
        return "connection closed by the broker"
    if isinstance(err, OSError):
        return "socket error %s" % (err.args[0] if err.args else err)
    return "%s: %s" % (type(err).__name__, err)


def connect_packet(client_id, keepalive, clean=True, will=None, user=None, password=None):
    """The CONNECT packet's bytes (spec 3.1). `will` = (topic, message, qos, retain)."""
    if password is not None and user is None:
        raise ValueError("MQTT 3.1.1 allows a password only with a user name")
    if not 0 <= keepalive <= 65535:
        raise ValueError("keepalive must be 0..65535 s")
    flags = 0x02 if clean else 0
    payload = [_str(client_id)]
    if will is not None:
        topic, message, qos, retain = will
        if qos not in (0, 1, 2):
            raise ValueError("will QoS must be 0, 1 or 2")
        flags |= 0x04 | qos << 3 | (0x20 if retain else 0)
        payload += [_str(topic), _str(message)]
    if user is not None:
        flags |= 0x80
        payload.append(_str(user))
    if password is not None:
        flags |= 0x40
        payload.append(_str(password))
    body = b"\x00\x04MQTT\x04" + bytes((flags,)) + struct.pack("!H", keepalive) + b"".join(payload)
    return b"\x10" + _varlen(len(body)) + body


class Client:
    """One broker session at a time; connect() again after ConnectionLost.

    Counters: .received (PUBLISH delivered), .oversize (PUBLISH dropped, too big),
    .pings (PINGRESP seen), .callback_errors; .error is why the last connection ended.
    """

    def __init__(self, client_id, host, port=1883, *, user=None, password=None, keepalive=60,
                 clean=True, will=None, max_packet=8192, timeout_ms=10000, on_message=None):
        self.client_id = client_id
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.keepalive = keepalive
        self.clean = clean
        self.will = will
        self.max_packet = max_packet
        self.timeout_ms = timeout_ms
        self.on_message = on_message
        self.connected = False
        self.error = None
        self.received = 0
        self.oversize = 0
        self.pings = 0
        self.callback_errors = 0
        self._reader = None
        self._writer = None
        self._lock = asyncio.Lock()
        self._waiting = {}  # (packet type, packet id) -> [Event, body or None]
        self._tasks = []
        self._pid = 0
        self._last_rx = self._last_tx = time.ticks_ms()

    # --- connection ---------------------------------------------------------------
    async def connect(self):
        """Open TCP, send CONNECT, wait for CONNACK; returns the session-present flag.

        Raises ConnectRefused (broker said no), Timeout, or ConnectionLost (no route,
        refused or reset socket: the message says which).
        """
        self.close()
        self.error = None
        try:
            self._reader, self._writer = await asyncio.wait_for_ms(
                asyncio.open_connection(self.host, self.port), self.timeout_ms)
        except asyncio.TimeoutError:
            raise self._set_error(Timeout("no TCP connection to %s:%d within %d ms"
                                          % (self.host, self.port, self.timeout_ms)))
        except OSError as e:
            raise self._set_error(ConnectionLost("cannot reach %s:%d: %s"
                                                 % (self.host, self.port, _why(e))))
        self._last_rx = self._last_tx = time.ticks_ms()
        self._tasks.append(asyncio.create_task(self._read_loop()))
        packet = connect_packet(self.client_id, self.keepalive, self.clean, self.will,
                                self.user, self.password)
        slot = self._expect(CONNACK, 0)
        try:
            await self._send(packet)
            body = await self._wait(CONNACK, 0, slot, "CONNACK")
            if len(body) != 2:
                raise ProtocolError("CONNACK of %d bytes" % len(body))
            if body[1]:
                raise ConnectRefused(body[1])
        except MQTTError as e:
            self._fail(e)
            self.error = e  # e.g. the refusal, not the close that follows it
            raise
        self.connected = True
        if self.keepalive:
            self._tasks.append(asyncio.create_task(self._ping_loop()))
        return bool(body[0] & 1)

    async def disconnect(self):
        """Say goodbye (no last will is published), then close."""
        if self.connected:
            self.error = ConnectionLost("disconnected by the client")
            try:
                await self._send(b"\xe0\x00")
            except MQTTError:
                pass
        self.close()

    def close(self):
        """Drop the connection now (no DISCONNECT: the broker publishes the will)."""
        self._fail(ConnectionLost("closed by the client"))

    def _set_error(self, err):
        self.error = err
        return err

    def _fail(self, err):
        """End the connection once: stop tasks, close the socket, wake every waiter."""
        self.connected = False
        if self._writer is None:
            return
        if self.error is None:
            self.error = err if isinstance(err, MQTTError) else ConnectionLost(_why(err))
        me = asyncio.current_task()
        for task in self._tasks:
            if task is not me:
                task.cancel()
        self._tasks = []
        writer, self._writer, self._reader = self._writer, None, None
        try:  # MicroPython's Stream.close() is a no-op (wait_closed() closes): close the socket
            getattr(writer, "s", writer).close()
        except OSError:
            pass
        waiting, self._waiting = self._waiting, {}
        for slot in waiting.values():
            slot[0].ring()  # body stays None: the waiter raises ConnectionLost

    # --- sending ------------------------------------------------------------------
    async def _send(self, *parts):
        writer = self._writer
        if writer is None:
            raise self.error or ConnectionLost("not connected")
        async with self._lock:
            if writer is not self._writer:
                raise self.error
            try:
                # A small packet goes out in one write: a header sent alone makes the
                # payload wait for the peer's delayed ACK (Nagle), ~40 ms per message.
                # A big one is written in parts: no contiguous copy on a fragmented heap.
                if len(parts) > 1 and sum(len(p) for p in parts) <= JOIN_MAX:
                    joined = bytearray(parts[0])
                    for part in parts[1:]:
                        joined.extend(part)  # any buffer, memoryview included
                    parts = (joined,)
                for part in parts:
                    writer.write(part)
                # write() sends what the socket takes at once; only the rest (out_buf, in
                # MicroPython's asyncio/stream.py) needs drain(), whose wait_for_ms costs
                # two tasks and three turns of the loop
                if writer.out_buf:
                    await asyncio.wait_for_ms(writer.drain(), self.timeout_ms)
            except asyncio.TimeoutError:
                self._fail(Timeout("socket write stalled for %d ms" % self.timeout_ms))
                raise self.error
            except OSError as e:
                self._fail(e)
                raise self.error
        self._last_tx = time.ticks_ms()

    def _next_pid(self):
        while True:
            self._pid = self._pid % 65535 + 1
            if (PUBACK, self._pid) not in self._waiting and (SUBACK, self._pid) not in \
                    self._waiting:
                return self._pid

    def _expect(self, kind, pid):
        slot = [Doorbell(), None]
        self._waiting[(kind, pid)] = slot
        return slot

    async def _send_expecting(self, kind, pid, *parts):
        """Send a packet the broker answers with (kind, pid); the slot its answer comes to."""
        slot = self._expect(kind, pid)
        try:
            await self._send(*parts)
        except MQTTError:
            self._waiting.pop((kind, pid), None)
            raise
        return slot

    async def _wait(self, kind, pid, slot, what, timeout_ms=None):
        timeout_ms = timeout_ms or self.timeout_ms
        if not await slot[0].wait(timeout_ms):
            self._waiting.pop((kind, pid), None)
            raise Timeout("no %s from the broker within %d ms" % (what, timeout_ms))
        if slot[1] is None:
            raise self.error or ConnectionLost("connection lost")
        return slot[1]

    async def publish(self, topic, payload, qos=0, retain=False, timeout_ms=None):
        """Send PUBLISH; at QoS 1 return only once PUBACK arrived (Timeout otherwise)."""
        sent = await self.send_publish(topic, payload, qos, retain)
        if sent is None:
            return None
        await self.acked(sent, timeout_ms)
        return sent[0]

    async def send_publish(self, topic, payload, qos=0, retain=False):
        """Write PUBLISH and return at once; at QoS 1 what acked() waits on (else None)."""
        if qos not in (0, 1):
            raise ValueError("this client publishes at QoS 0 or 1")
        head = _str(topic)
        size = len(head) + len(payload) + (2 if qos else 0)
        if size > self.max_packet:
            raise ValueError("PUBLISH of %d bytes is over max_packet (%d)" % (size, self.max_packet))
        first = bytes((0x30 | qos << 1 | (1 if retain else 0),)) + _varlen(size)
        if not qos:
            await self._send(first + head, payload)
            return None
        pid = self._next_pid()
        return pid, await self._send_expecting(PUBACK, pid, first + head + struct.pack("!H", pid),
                                               payload)

    async def acked(self, sent, timeout_ms=None):
        """Until the PUBACK of what send_publish() wrote (Timeout, or the connection's error)."""
        pid, slot = sent
        await self._wait(PUBACK, pid, slot, "PUBACK for packet %d" % pid, timeout_ms)

    async def subscribe(self, topic, qos=1):
        """SUBSCRIBE one filter; returns the granted QoS (MQTTError if refused)."""
        if qos not in (0, 1):
            raise ValueError("this client subscribes at QoS 0 or 1")
        pid = self._next_pid()
        body = struct.pack("!H", pid) + _str(topic) + bytes((qos,))
        slot = await self._send_expecting(SUBACK, pid, b"\x82" + _varlen(len(body)), body)
        ack = await self._wait(SUBACK, pid, slot, "SUBACK")
        if len(ack) < 3 or ack[2] == 0x80:
            raise SubscribeRefused("broker refused the subscription to %s" % topic)
        return ack[2]

    # --- receiving ------------------------------------------------------------------
    async def _read_loop(self):
        try:
            while True:
                await self._read_packet()
        except Exception as e:  # CancelledError is a BaseException: close() passes through
            self._fail(e)

    async def _read_packet(self):
        reader = self._reader
        first = (await reader.readexactly(1))[0]
        size = 0
        shift = 0
        while True:
            digit = (await reader.readexactly(1))[0]
            size |= (digit & 0x7F) << shift
            if not digit & 0x80:
                break
            shift += 7
            if shift > 21:
                raise ProtocolError("malformed remaining length")
        self._last_rx = time.ticks_ms()
        kind = first >> 4
        if size > self.max_packet:
            if kind != PUBLISH:
                raise ProtocolError("packet type %d of %d bytes" % (kind, size))
            await self._skip_publish(first, size)
            return
        if kind == PUBLISH:
            await self._on_publish(first, size)
            return
        body = await reader.readexactly(size) if size else b""
        if kind == PUBACK or kind == SUBACK:
            if len(body) < 2:
                raise ProtocolError("short ack")
            self._wake(kind, struct.unpack_from("!H", body)[0], body)
        elif kind == CONNACK:
            self._wake(CONNACK, 0, body)
        elif kind == PINGRESP:
            self.pings += 1
        else:
            raise ProtocolError("unexpected packet type %d" % kind)

    def _wake(self, kind, pid, body):
        slot = self._waiting.pop((kind, pid), None)
        if slot is not None:  # else a late ack after a timeout: nothing waits for it
            slot[1] = body
            slot[0].ring()

    async def _on_publish(self, first, size):
        """A PUBLISH read in its parts, the payload in one piece of its own: a 2 KB downlink
        is never held twice (the whole packet and its payload sliced out), which a
        devkitc's fragmented heap could not take."""
        reader = self._reader
        qos = (first >> 1) & 3
        if qos == 2:
            raise ProtocolError("QoS 2 PUBLISH, but this client subscribes at QoS <= 1")
        n = struct.unpack("!H", await reader.readexactly(2))[0]
        head = n + 2 + (2 if qos else 0)
        if head > size:
            raise ProtocolError("PUBLISH topic longer than the packet")
        topic = await reader.readexactly(n)
        pid = struct.unpack("!H", await reader.readexactly(2))[0] if qos else 0
        payload = await reader.readexactly(size - head) if size > head else b""
        self.received += 1
        if self.on_message is not None:
            try:
                self.on_message(topic.decode(), payload, bool(first & 1))
            except Exception as e:  # a bad callback must not take the link down
                self.callback_errors += 1
                print("mqtt: on_message failed:", _why(e))
        if qos:
            await self._send(b"\x40\x02" + struct.pack("!H", pid))

    async def _skip_publish(self, first, size):
        """Read an oversized PUBLISH in 256-byte pieces, ack it at QoS 1, count it."""
        reader = self._reader
        qos = (first >> 1) & 3
        left = size - 2
        n = min(struct.unpack("!H", await reader.readexactly(2))[0], left)
        left -= n
        while n:
            n -= len(await reader.readexactly(min(n, 256)))
        pid = 0
        if qos and left >= 2:
            pid = struct.unpack("!H", await reader.readexactly(2))[0]
            left -= 2
        while left > 0:
            left -= len(await reader.readexactly(min(left, 256)))
        self.oversize += 1
        if qos == 1:
            await self._send(b"\x40\x02" + struct.pack("!H", pid))

    # --- keepalive ------------------------------------------------------------------
    async def _ping_loop(self):
        """PINGREQ after keepalive/2 of silence either way; no packet for keepalive = dead."""
        period = self.keepalive * 1000
        step = max(100, min(1000, period // 4))
        while True:
            await asyncio.sleep_ms(step)
            now = time.ticks_ms()
            if time.ticks_diff(now, self._last_rx) >= period:
                self._fail(ConnectionLost("no answer from the broker for %d s (keepalive)"
                                          % self.keepalive))
                return
            if time.ticks_diff(now, self._last_rx) >= period // 2 or \
                    time.ticks_diff(now, self._last_tx) >= period // 2:
                try:
                    await self._send(b"\xc0\x00")
                except MQTTError:
                    return

"""paho's client with buffered socket reads and writes: fewer system calls per message.

paho reads every packet with three or more `recv` calls (the command byte, the
remaining length one byte at a time, then the rest) and one `select` per packet when
it has nothing of its own in flight. On the gateway's load that is ~7 receive calls
per envelope (the envelope from the pole broker, the PUBACK from the city's broker),
each a system call plus Python's exception machinery for the last, empty one.

`BufferedClient` wraps the connection's socket so that one `recv` takes whatever the
kernel holds (up to 64 KiB) and paho's small reads are served from memory; it reports
the buffered bytes through `pending()`, the hook paho already uses for TLS sockets
(bytes pending: select() does not wait, the read goes ahead). Its `loop_read` reads
up to `READ_BURST` packets per wake-up, until the socket would block, instead of one.
Writes the same way: paho sends each queued packet with its own `send` (a group
commit acknowledges ~100 envelopes: 100 PUBACKs); here they collect in the socket's
buffer and one `send` at the end of paho's write turn takes them all, and `corked()`
does the same for a batch of publishes from the polling thread.
Nothing else changes: the same packets, the same order, the same callbacks.

`poll()` is one turn of the network loop for a client that its own thread drives (the
forwarder): paho's `loop()` would create its wake-up socket pair, and then every
publish writes a byte to it and wakes the next select() for nothing.

It uses three of paho's internal methods (`_create_socket`, `_packet_read`,
`_loop_rc_handle`, all in paho 2.x); when a paho version lacks them, `BufferedClient`
is paho's plain client (with `poll()` and a `corked()` that changes nothing).
"""

from __future__ import annotations

import select
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import paho.mqtt.client as mqtt

READ_SIZE = 65536
READ_BURST = 256


_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class BufferedSocket:
    """A socket whose `recv` is served from a buffer filled by one large `recv`, and
    whose `send` only appends to an output buffer that `flush` writes."""

    def __init__(self, sock):
        self._sock = sock
        self._buf = b""
        self._pos = 0
        self._out = bytearray()

    def send(self, data) -> int:
        self._out += data
        return len(data)

    def unsent(self) -> int:
        return len(self._out)

    def flush(self) -> None:
        """Write what the kernel takes now; the rest waits for the socket to be
        writable (`want_write`). Raises OSError when the connection is gone."""
        out = self._out
        while out:
            try:
                sent = self._sock.send(out)
            except _WOULD_BLOCK:
                return
            del out[:sent]

    def close(self) -> None:
        try:  # paho closes right after queueing a DISCONNECT: write it first
            self.flush()
        except OSError:
            pass
        self._sock.close()

    def recv(self, size: int) -> bytes:
        pos, buf = self._pos, self._buf
        if pos < len(buf):
            end = min(pos + size, len(buf))
            self._pos = end
            return buf[pos:end]
        data = self._sock.recv(max(size, READ_SIZE))  # BlockingIOError, b"" at EOF: as is
        if len(data) <= size:
            return data
        self._buf, self._pos = data, size
        return data[:size]

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)  # TLS: bytes decrypted, not read
        return len(self._buf) - self._pos + (inner() if inner else 0)

    def fileno(self) -> int:
        return self._sock.fileno()

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


_SUPPORTED = all(hasattr(mqtt.Client, name) for name in ("_create_socket", "_packet_read",
                                                   "_loop_rc_handle"))


class BufferedClient(mqtt.Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._corked = False  # inside corked(): writes wait for the block's end

    if _SUPPORTED:
        def _create_socket(self):
            return BufferedSocket(super()._create_socket())

        def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
            for _ in range(max(max_packets, READ_BURST)):
                if self._sock is None:
                    return mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
                rc = self._packet_read()
                if rc == mqtt.MQTTErrorCode.MQTT_ERR_AGAIN:
                    return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
                if rc > 0:
                    return self._loop_rc_handle(rc)
            return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

        def loop_write(self) -> mqtt.MQTTErrorCode:
            """paho's write turn hands every queued packet to the socket's buffer; one
            `send` then writes them all (unless corked: the cork's end writes)."""
            rc = super().loop_write()
            sock = self._sock
            if rc or sock is None or self._corked:
                return rc
            try:
                sock.flush()
            except OSError:
                return self._loop_rc_handle(mqtt.MQTTErrorCode.MQTT_ERR_CONN_LOST)
            return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

        def want_write(self) -> bool:
            sock = self._sock
            return super().want_write() or (sock is not None and sock.unsent() > 0)

    @contextmanager
    def corked(self) -> Iterator[None]:
        """Publishes from the polling thread inside this block go out in one write
        at its end (paho writes each at once otherwise)."""
        self._corked = True
        try:
            yield
        finally:
            self._corked = False
        if self._sock is not None:
            self.loop_write()

    def poll(self, timeout: float) -> mqtt.MQTTErrorCode:
        """`loop(timeout)` from paho's public pieces, without the wake-up socket pair:
        a publish from the polling thread is written at once by paho itself."""
        sock = self.socket()
        if sock is None:
            return mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
        pending = sock.pending() if hasattr(sock, "pending") else 0
        try:
            readable, writable, _ = select.select(
                [sock], [sock] if self.want_write() else [], [], 0.0 if pending else timeout)
        except (OSError, ValueError, TypeError):  # closed under us: the connection is gone
            return mqtt.MQTTErrorCode.MQTT_ERR_CONN_LOST
        if readable or pending:
            rc = self.loop_read()
            if rc or self.socket() is None:
                return rc or mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
        if writable or self.want_write():
            rc = self.loop_write()
            if rc or self.socket() is None:
                return rc or mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
        return self.loop_misc()

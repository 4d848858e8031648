"""The host end of the board's wires (board_side/emu_link.py speaks the other end).

Frames: request <B op><B sub><H len> payload; response <b status><H len> data,
status 0 or -errno. The op numbers are the same in board_side/emu_link.py.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Callable

from .sockets import Listener

log = logging.getLogger(__name__)

HELLO, STATE, RESET, WDT_INIT, WDT_FEED, PIN, PWM, ADC = 1, 2, 3, 4, 5, 6, 7, 8
I2C_WRITE, I2C_READ, I2C_SCAN = 10, 11, 12
UART_INIT, UART_WRITE, UART_READ, I2S_INIT = 13, 14, 15, 17
WLAN, RESOLVE, NVS, ROMFS, CPU_FREQ = 20, 21, 22, 23, 24

Handler = Callable[[int, int, bytes], bytes]
_REQUEST = struct.Struct("<BBH")
_RESPONSE = struct.Struct("<bH")


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


class BusServer:
    """Listens on loopback; each VM process of the board opens one connection."""

    def __init__(self, handler: Handler):
        self._handler = handler
        self._listener = Listener()
        self.port = self._listener.port
        self._listener.serve(self._serve, name="bus")

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                return
            while True:
                try:
                    head = _recv_exact(conn, _REQUEST.size)
                    if head is None:
                        return
                    op, sub, size = _REQUEST.unpack(head)
                    payload = _recv_exact(conn, size) if size else b""
                    if payload is None:
                        return
                except OSError:
                    return
                try:
                    data, status = self._handler(op, sub, payload), 0
                except OSError as exc:
                    data, status = b"", -(exc.errno or errno.EIO)
                except Exception:  # a bug in a simulated part must not hang the VM
                    log.exception("bus op %d failed", op)
                    data, status = b"", -errno.EIO
                try:
                    conn.sendall(_RESPONSE.pack(status, len(data)) + data)
                except OSError:
                    return

    def close(self) -> None:
        self._listener.close()

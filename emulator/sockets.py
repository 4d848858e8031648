"""One accept loop for every listening socket of an emulated board.

The bus, the control socket, the radio's relays, the RFC 2217 port and the I2S
streams all listen the same way: accept until the listener is closed, then stop,
without a thread left blocked in accept() (closing a socket does not wake a
thread blocked in it on Linux, so accept() waits POLL_S at a time).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

POLL_S = 0.2           # how long accept() waits before it looks at `closed` again
RETRY_S = 0.05         # after an accept() error other than a closed listener (EMFILE, ...)


class Listener:
    """A listening socket and its accept loop; close() ends the loop."""

    def __init__(self, server: socket.socket | None = None, poll_s: float = POLL_S) -> None:
        """server: a bound, listening socket; by default a TCP one on a free loopback port."""
        self.sock = server if server is not None else socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(poll_s)
        self.closed = threading.Event()

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def accept(self) -> socket.socket | None:
        """The next connection (blocking), or None once the listener is closed."""
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self.closed.is_set() or self.sock.fileno() < 0:
                    return None
                log.warning("accept on %s failed: %s", self.sock.getsockname(), exc)
                self.closed.wait(RETRY_S)
                continue
            conn.settimeout(None)  # a connection blocks, whatever the listener's poll
            return conn
        return None

    def serve(self, handle: Callable[[socket.socket], None], name: str,
              per_connection: bool = True) -> threading.Thread:
        """Accept in a daemon thread until closed. Each connection goes to handle(), in a
        thread of its own, or in the accepting thread one at a time (per_connection=False:
        a serial port's single client, a relay that connects before it accepts again)."""

        def loop() -> None:
            while (conn := self.accept()) is not None:
                if per_connection:
                    threading.Thread(target=handle, args=(conn,), name=f"{name}-conn",
                                     daemon=True).start()
                else:
                    handle(conn)

        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.closed.set()
        self.sock.close()

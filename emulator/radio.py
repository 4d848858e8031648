"""The board's Wi-Fi: an access point the board joins, and the path its TCP takes.

Names the board resolves (socket.getaddrinfo) map to a loopback relay port owned
here, so the firmware's real sockets reach the real destination only while the
link is up; when the link drops every relayed connection is cut, as a lost
association cuts them on the chip.
"""

from __future__ import annotations

import errno
import random
import select
import socket
import threading
import time

from .sockets import Listener

STAT_IDLE, STAT_CONNECTING, STAT_GOT_IP = 1000, 1001, 1010
STAT_NO_AP_FOUND, STAT_WRONG_PASSWORD, STAT_BEACON_TIMEOUT = 201, 202, 200
ASSOCIATION_S = 0.3


class Radio:
    def __init__(self, ssid: str | None = None, password: str | None = None):
        self.ap_ssid = ssid          # None: any SSID/password is accepted
        self.ap_password = password
        self.ap_up = True
        self.rssi = -61
        self.active = False
        self._want: tuple[str, str] | None = None
        self._status = STAT_IDLE
        self._assoc_at = 0.0
        self._relays: dict[tuple[str, int], _Relay] = {}
        self._lock = threading.Lock()

    # --- WLAN -------------------------------------------------------------------
    def connect(self, ssid: str, password: str) -> None:
        if not self.active:
            raise OSError(errno.EPERM, "STA must be active")
        self._want = (ssid, password)
        self._status = STAT_CONNECTING
        self._assoc_at = time.monotonic() + ASSOCIATION_S

    def disconnect(self) -> None:
        self._want = None
        self._status = STAT_IDLE
        self._cut_all()

    def status(self) -> int:
        if self._want is None or not self.active:
            return STAT_IDLE
        if not self.ap_up:
            return STAT_NO_AP_FOUND if self._status != STAT_GOT_IP else STAT_BEACON_TIMEOUT
        if self.ap_ssid is not None and self._want[0] != self.ap_ssid:
            return STAT_NO_AP_FOUND
        if self.ap_password is not None and self._want[1] != self.ap_password:
            return STAT_WRONG_PASSWORD
        if self._status == STAT_CONNECTING and time.monotonic() >= self._assoc_at:
            self._status = STAT_GOT_IP
        return self._status

    def connected(self) -> bool:
        return self.status() == STAT_GOT_IP

    def set_ap(self, up: bool) -> None:
        """Fault injection: the access point (or the antenna) goes away and comes back."""
        self.ap_up = up
        if not up:
            self._cut_all()
            if self._want is not None:
                self._status = STAT_BEACON_TIMEOUT
        elif self._want is not None:
            self._status = STAT_CONNECTING
            self._assoc_at = time.monotonic() + ASSOCIATION_S

    def signal_dbm(self) -> int:
        return self.rssi + random.randint(-3, 3) if self.connected() else 0

    # --- TCP --------------------------------------------------------------------
    def resolve(self, host: str, port: int) -> int:
        """The loopback port of a relay to (host, port); fails while the link is down."""
        if not self.connected():
            raise OSError(errno.ENETUNREACH, "Wi-Fi link is down")
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror:
            raise OSError(errno.ENOENT, f"cannot resolve {host}") from None
        with self._lock:
            relay = self._relays.get((host, port))
            if relay is None:
                relay = self._relays[(host, port)] = _Relay(self, host, port)
            return relay.port

    def _cut_all(self) -> None:
        with self._lock:
            relays = list(self._relays.values())
        for relay in relays:
            relay.cut()

    def close(self) -> None:
        with self._lock:
            relays, self._relays = list(self._relays.values()), {}
        for relay in relays:
            relay.close()


class _Relay:
    def __init__(self, radio: Radio, host: str, port: int):
        self._radio = radio
        self._target = (host, port)
        self._listener = Listener()
        self.port = self._listener.port
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        # one at a time: the connection to the far end is made before the next accept
        self._listener.serve(self._connect, name=f"relay {host}:{port}", per_connection=False)

    def _connect(self, board: socket.socket) -> None:
        """Join the board's connection to the far end, or refuse it while the link is down."""
        if not self._radio.connected():
            _reset(board)
            return
        try:
            remote = socket.create_connection(self._target, timeout=5)
        except OSError:
            _reset(board)
            return
        remote.settimeout(None)
        with self._lock:
            self._pairs.append((board, remote))
        threading.Thread(target=self._pipe, args=(board, remote), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    peers[s].sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                if (a, b) in self._pairs:
                    self._pairs.remove((a, b))
            _reset(a)
            _reset(b)

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            _reset(a)
            _reset(b)

    def close(self) -> None:
        self.cut()
        self._listener.close()


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    except OSError:
        pass

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
# ESP-IDF disconnect reasons (wifi_err_reason_t) the station sees here
REASON_ASSOC_LEAVE, REASON_BEACON_TIMEOUT = 8, 200
REASON_NO_AP_FOUND, REASON_AUTH_FAIL = 201, 202
STAT_NO_AP_FOUND, STAT_WRONG_PASSWORD, STAT_BEACON_TIMEOUT = 201, 202, 200
# How long one esp_wifi_connect() takes to end: associated with an address, a scan that
# found no such access point, or an authentication the access point refused.
ASSOCIATION_S = 1.0
NO_AP_SCAN_S = 2.0
AUTH_FAIL_S = 1.0


class WifiStateError(OSError):
    """connect() while the station is still connecting: the ESP32 port raises
    OSError('Wifi Internal State Error') (esp_wifi_set_config: ESP_ERR_WIFI_STATE)."""


class WifiNotStarted(OSError):
    """connect()/disconnect() with the station inactive: OSError('Wifi Not Started')."""


class Radio:
    """The station as network_wlan.c (MicroPython v1.28) drives ESP-IDF's Wi-Fi.

    connect() asks for a connection (wifi_sta_connect_requested); each attempt ends in
    an address or a disconnect reason, and while a connection is requested the port
    starts the next attempt itself, after any reason, until disconnect(). status() is
    the port's: GOT_IP when connected, the last reason for NO_AP_FOUND and AUTH_FAIL
    (which only an address clears), IDLE after disconnect() (reason ASSOC_LEAVE) or
    when nothing was asked, CONNECTING while it retries after any other reason (a lost
    beacon). Attempts are played out lazily, each time the state is looked at.
    """

    def __init__(self, ssid: str | None = None, password: str | None = None):
        self.ap_ssid = ssid          # None: any SSID/password is accepted
        self.ap_password = password
        self.ap_up = True
        self.rssi = -61
        self._relays: dict[tuple[str, int], _Relay] = {}
        self._lock = threading.Lock()
        self._state = threading.RLock()
        self.power_off()

    def power_off(self) -> None:
        """A hard reset, a deep sleep or a power cut: the Wi-Fi driver starts over."""
        with self._state:
            self.active = False
            self._want: tuple[str, str] | None = None
            self._requested = False      # wifi_sta_connect_requested
            self._connected = False      # wifi_sta_connected (got an address)
            self._reason = 0             # wifi_sta_disconn_reason
            self._attempt_ends: float | None = None
        self._cut_all()

    # --- WLAN -------------------------------------------------------------------
    def set_active(self, active: bool) -> None:
        """WLAN.active(flag): stopping the station leaves the access point (ASSOC_LEAVE);
        a requested connection stays requested but nothing retries it."""
        with self._state:
            self._play()
            if not active:
                self._leave()
            self.active = active

    def connect(self, ssid: str, password: str) -> None:
        with self._state:
            if not self.active:
                raise WifiNotStarted(errno.EPERM, "Wifi Not Started")
            self._play()
            if self._attempt_ends is not None:
                raise WifiStateError(errno.EBUSY, "Wifi Internal State Error")
            if self._connected:  # a new association: the current one ends
                self._connected = False
                self._cut_all()
            self._want = (ssid, password)
            self._requested = True
            self._start_attempt(time.monotonic())

    def disconnect(self) -> None:
        with self._state:
            if not self.active:
                raise WifiNotStarted(errno.EPERM, "Wifi Not Started")
            self._play()
            self._requested = False
            self._leave()

    def _leave(self) -> None:
        """The station leaves its access point, or gives up its attempt: ASSOC_LEAVE."""
        if self._connected or self._attempt_ends is not None:
            self._reason = REASON_ASSOC_LEAVE
        self._connected = False
        self._attempt_ends = None
        self._cut_all()

    def status(self) -> int:
        """network_wlan.c's status() for the station."""
        with self._state:
            self._play()
            reason = self._reason
            if self._connected:
                return STAT_GOT_IP
            if reason in (REASON_NO_AP_FOUND, REASON_AUTH_FAIL):
                return reason
            if reason == REASON_ASSOC_LEAVE:
                return STAT_IDLE
            if self._requested:
                return STAT_CONNECTING
            return STAT_IDLE if reason == 0 else reason

    def connected(self) -> bool:
        with self._state:
            self._play()
            return self._connected

    # --- attempts -----------------------------------------------------------------
    def _outcome(self) -> int | None:
        """What an attempt ending now finds: None (an address) or a disconnect reason."""
        assert self._want is not None
        if not self.ap_up or (self.ap_ssid is not None and self._want[0] != self.ap_ssid):
            return REASON_NO_AP_FOUND
        if self.ap_password is not None and self._want[1] != self.ap_password:
            return REASON_AUTH_FAIL
        return None

    def _start_attempt(self, at: float) -> None:
        outcome = self._outcome()
        length = {None: ASSOCIATION_S, REASON_NO_AP_FOUND: NO_AP_SCAN_S}.get(outcome,
                                                                           AUTH_FAIL_S)
        self._attempt_ends = at + length

    def _play(self) -> None:
        """End the attempts that are over by now; the port starts the next one at once
        while a connection is requested."""
        now = time.monotonic()
        while self._attempt_ends is not None and self._attempt_ends <= now:
            ended = self._attempt_ends
            outcome = self._outcome()
            if outcome is None:
                self._connected, self._reason, self._attempt_ends = True, 0, None
                return
            self._reason = outcome
            self._attempt_ends = None
            if self._requested and self.active:
                self._start_attempt(ended)

    def set_ap(self, up: bool) -> None:
        """Fault injection: the access point (or the antenna) goes away and comes back.
        A station that had an address loses the beacon (BEACON_TIMEOUT) and, as the port
        does, starts its first retry; the link is noticed down at once here (on the chip
        only after the beacon timeout, during which it still reports GOT_IP)."""
        with self._state:
            self._play()
            self.ap_up = up
            if not up:
                self._cut_all()
                if self._connected:
                    self._connected = False
                    self._reason = REASON_BEACON_TIMEOUT
                    if self._requested:
                        self._start_attempt(time.monotonic())

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
        """Copy both ways until both ends have closed. An orderly close on one side is
        passed on as one (FIN after the data, as lwIP closes), so a DISCONNECT written
        just before a close reaches the broker; an error resets both sides."""
        peers = {a: b, b: a}
        reading = [a, b]
        orderly = False
        try:
            while reading:
                ready, _, _ = select.select(reading, [], [], 1.0)
                for s in ready:
                    data = s.recv(65536)
                    if data:
                        peers[s].sendall(data)
                        continue
                    reading.remove(s)
                    peers[s].shutdown(socket.SHUT_WR)
            orderly = True
        except OSError:
            pass
        finally:
            with self._lock:
                if (a, b) in self._pairs:
                    self._pairs.remove((a, b))
            for s in (a, b):
                if orderly:
                    s.close()
                else:
                    _reset(s)

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

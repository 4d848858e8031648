"""The board's Wi-Fi: an access point the board joins, and the path its traffic takes.

Names the board resolves (socket.getaddrinfo) map to a loopback relay port owned
here, for TCP and for UDP alike (the same port number), so the firmware's real
sockets reach the real destination only while the link is up; when the link drops
every relayed connection is cut, as a lost association cuts them on the chip.
Datagrams cross the air as on Wi-Fi (Link): a delay each way, jitter, some lost.
TCP is not delayed (not modelled: its retransmissions would hide loss anyway).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import random
import select
import socket
import threading
import time
from dataclasses import asdict, dataclass

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
MAX_DATAGRAM_PEERS = 16   # board sockets a UDP relay keeps a far socket for


class WifiStateError(OSError):
    """connect() while the station is still connecting: the ESP32 port raises
    OSError('Wifi Internal State Error') (esp_wifi_set_config: ESP_ERR_WIFI_STATE)."""


class WifiNotStarted(OSError):
    """connect()/disconnect() with the station inactive: OSError('Wifi Not Started')."""


@dataclass
class Link:
    """The air between the board and the access point, for datagrams. Each way a fixed
    delay plus an exponential part (Wi-Fi's contention and retries: mostly a few ms, now
    and then tens), and a share lost. Uplink and downlink differ, as on a real link: an
    NTP client cannot see that asymmetry, half of it is its error."""
    up_ms: float = 3.0
    down_ms: float = 2.0
    jitter_ms: float = 3.0      # mean of the exponential part, each way
    loss: float = 0.02

    def delay_s(self, base_ms: float) -> float:
        extra = random.expovariate(1 / self.jitter_ms) if self.jitter_ms > 0 else 0.0
        return (base_ms + extra) / 1000

    def lost(self) -> bool:
        return random.random() < self.loss


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
        self.link = Link()
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

    def set_link(self, **settings: float) -> dict:
        """Fault injection and realism: the datagram link's delays and loss (Link)."""
        for name, value in settings.items():
            if name not in Link.__dataclass_fields__ or float(value) < 0:
                raise ValueError(f"link setting {name}={value!r}: one of "
                                 f"{', '.join(Link.__dataclass_fields__)}, >= 0")
            setattr(self.link, name, float(value))
        return asdict(self.link)

    def signal_dbm(self) -> int:
        return self.rssi + random.randint(-3, 3) if self.connected() else 0

    # --- TCP and UDP --------------------------------------------------------------
    def resolve(self, host: str, port: int) -> int:
        """The loopback port of the relays to (host, port), TCP and UDP on the same number;
        fails while the link is down."""
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


def _twin_sockets() -> tuple[socket.socket, socket.socket]:
    """A listening TCP socket and a UDP socket bound to the same free loopback port."""
    for _ in range(50):
        tcp = socket.create_server(("127.0.0.1", 0))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind(tcp.getsockname())
            return tcp, udp
        except OSError:  # that number is taken for UDP: try another
            tcp.close()
            udp.close()
    raise OSError(errno.EADDRINUSE, "no loopback port free for both TCP and UDP")


class _Relay:
    def __init__(self, radio: Radio, host: str, port: int):
        self._radio = radio
        self._target = (host, port)
        tcp, udp = _twin_sockets()
        self._listener = Listener(tcp)
        self.port = self._listener.port
        self._datagrams = _DatagramRelay(radio, udp, self._target)
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
        self._datagrams.close()


class _DatagramRelay:
    """UDP between the board and (host, port), across the air (radio.link): one socket
    to the far end per board socket, so answers find their way back; a datagram is
    lost while the link is down, at either end of its flight."""

    def __init__(self, radio: Radio, sock: socket.socket, target: tuple[str, int]):
        self._radio = radio
        self._board_side = sock
        self._target = target
        self._far: dict[tuple[str, int], socket.socket] = {}    # board address -> socket
        self._board_of: dict[socket.socket, tuple[str, int]] = {}
        self._flights: list[tuple[float, int, socket.socket, bytes, tuple[str, int]]] = []
        self._order = itertools.count()
        self._closed = threading.Event()
        threading.Thread(target=self._run, name=f"udp relay {target}", daemon=True).start()

    def _send_later(self, base_ms: float, sock: socket.socket, data: bytes,
                    to: tuple[str, int]) -> None:
        link = self._radio.link
        if self._radio.connected() and not link.lost():
            heapq.heappush(self._flights, (time.monotonic() + link.delay_s(base_ms),
                                           next(self._order), sock, data, to))

    def _run(self) -> None:
        while not self._closed.is_set():
            wait = 0.2
            if self._flights:
                wait = max(0.0, min(wait, self._flights[0][0] - time.monotonic()))
            try:
                ready, _, _ = select.select([self._board_side, *self._board_of], [], [], wait)
                for sock in ready:
                    data, sender = sock.recvfrom(65536)
                    if sock is self._board_side:
                        self._send_later(self._radio.link.up_ms, self._far_for(sender), data,
                                         self._target)
                    else:
                        self._send_later(self._radio.link.down_ms, self._board_side, data,
                                         self._board_of[sock])
                while self._flights and self._flights[0][0] <= time.monotonic():
                    _, _, sock, data, to = heapq.heappop(self._flights)
                    if self._radio.connected():
                        sock.sendto(data, to)
            except OSError:
                if self._closed.is_set():
                    return
                # an ICMP error from a closed far port (ECONNREFUSED) or a full buffer:
                # the datagram is lost, as it would be on the air

    def _far_for(self, board: tuple[str, int]) -> socket.socket:
        far = self._far.get(board)
        if far is None:
            if len(self._far) >= MAX_DATAGRAM_PEERS:    # the oldest board socket is gone
                gone = self._far.pop(next(iter(self._far)))
                del self._board_of[gone]
                gone.close()
            far = self._far[board] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._board_of[far] = board
        return far

    def close(self) -> None:
        self._closed.set()
        for sock in (self._board_side, *list(self._board_of)):
            sock.close()


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    except OSError:
        pass

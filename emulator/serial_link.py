"""The board's USB-serial bridge as the host sees it: a pty path and an RFC 2217 port.

Both are views of the same UART0 and the same DTR/RTS lines, like one CP2102 that
two programs could open in turn. A Linux pty cannot carry modem lines, so only the
RFC 2217 view can reset the board into download mode (esptool over a pty needs
--before no-reset and the BOOT button: `citynode-emu ctl ... bootloader`).
"""

from __future__ import annotations

import errno
import logging
import os
import pty
import select
import socket
import threading
import time
import tty
from collections.abc import Callable
from pathlib import Path

from serial import rfc2217

from .sockets import Listener

log = logging.getLogger(__name__)


class Uart:
    """UART0 plus the modem lines, between the links and the board."""

    def __init__(self, on_receive: Callable[[bytes], None],
                 on_lines: Callable[[bool, bool], None]):
        self._on_receive = on_receive
        self._on_lines = on_lines
        self._sinks: list[Callable[[bytes], None]] = []
        self.dtr = False
        self.rts = False
        self.baudrate = 115200

    def attach(self, sink: Callable[[bytes], None]) -> None:
        self._sinks.append(sink)

    def transmit(self, data: bytes) -> None:
        """Board → host."""
        for sink in self._sinks:
            sink(data)

    def receive(self, data: bytes) -> None:
        """Host → board."""
        self._on_receive(data)

    def set_lines(self, dtr: bool | None = None, rts: bool | None = None) -> None:
        if dtr is not None:
            self.dtr = dtr
        if rts is not None:
            self.rts = rts
        self._on_lines(self.dtr, self.rts)


class PtyLink:
    """A pseudo-terminal whose slave path (symlinked at `path`) programs open."""

    def __init__(self, uart: Uart, path: Path):
        self.uart = uart
        self.path = path
        self.master, self._slave = pty.openpty()
        tty.setraw(self._slave)  # no echo, no line discipline: bytes pass as on a UART
        os.set_blocking(self.master, False)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        path.symlink_to(os.ttyname(self._slave))
        uart.attach(self.send)
        self._stop = threading.Event()
        threading.Thread(target=self._pump, name=f"pty {path.name}", daemon=True).start()

    def _pump(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if not ready:
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:
                time.sleep(0.05)
                continue
            if data:
                self.uart.receive(data)

    def send(self, data: bytes) -> None:
        deadline = time.monotonic() + 0.5
        while data:
            try:
                n = os.write(self.master, data)
                data = data[n:]
            except OSError as exc:
                if exc.errno != errno.EAGAIN or time.monotonic() > deadline:
                    return  # nobody is reading: bytes fall on the floor, as on a UART
                select.select([], [self.master], [], 0.05)

    def close(self) -> None:
        self._stop.set()
        if self.path.is_symlink():
            self.path.unlink()
        os.close(self.master)
        os.close(self._slave)


class _PortView:
    """What pyserial's RFC 2217 PortManager drives: our UART's settings and lines."""

    def __init__(self, uart: Uart):
        self._uart = uart
        self.bytesize, self.parity, self.stopbits = 8, "N", 1
        self.xonxoff = self.rtscts = self.break_condition = False
        self.cts = self.dsr = self.ri = self.cd = False

    @property
    def baudrate(self) -> int:
        return self._uart.baudrate

    @baudrate.setter
    def baudrate(self, value: int) -> None:
        self._uart.baudrate = value

    @property
    def dtr(self) -> bool:
        return self._uart.dtr

    @dtr.setter
    def dtr(self, value: bool) -> None:
        self._uart.set_lines(dtr=value)

    @property
    def rts(self) -> bool:
        return self._uart.rts

    @rts.setter
    def rts(self, value: bool) -> None:
        self._uart.set_lines(rts=value)

    def reset_input_buffer(self) -> None:
        pass

    def reset_output_buffer(self) -> None:
        pass


class Rfc2217Link:
    """An RFC 2217 server on loopback: one client at a time, like a serial port."""

    def __init__(self, uart: Uart, port: int, host: str = "127.0.0.1"):
        self.uart = uart
        self._listener = Listener(socket.create_server((host, port), reuse_port=False),
                                  poll_s=0.5)
        self.port = self._listener.port
        self._client: socket.socket | None = None
        self._manager: rfc2217.PortManager | None = None
        self._lock = threading.Lock()
        uart.attach(self.send)
        # one client at a time, like a serial port: the next waits for this one to close
        self._listener.serve(self._session, name=f"rfc2217 {self.port}", per_connection=False)

    @property
    def url(self) -> str:
        return f"rfc2217://127.0.0.1:{self.port}"

    def write(self, data: bytes) -> None:  # PortManager's connection
        client = self._client
        if client is not None:
            try:
                client.sendall(data)
            except OSError:
                pass

    def send(self, data: bytes) -> None:
        with self._lock:
            if self._manager is not None:
                self.write(data.replace(rfc2217.IAC, rfc2217.IAC + rfc2217.IAC))

    def _session(self, client: socket.socket) -> None:
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            client.close()
            return
        with self._lock:
            self._client = client
            self._manager = rfc2217.PortManager(_PortView(self.uart), self)
        try:
            while not self._listener.closed.is_set():
                try:
                    data = client.recv(4096)
                except OSError:
                    break
                if not data:
                    break
                payload = b"".join(self._manager.filter(data))
                if payload:
                    self.uart.receive(payload)
        finally:
            with self._lock:
                self._client = None
                self._manager = None
            client.close()
            # the port is closed: a USB bridge drops DTR and RTS
            self.uart.set_lines(dtr=False, rts=False)

    def close(self) -> None:
        self._listener.close()

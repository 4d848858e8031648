"""An I2S receiver's DMA ring, fed at the sample clock over a loopback socket.

The board side (board_side/emu_machine.py, I2S) reads the socket; this end paces
the samples a part produces as the ESP32's DMA would fill its ring, and drops the
oldest when the firmware falls behind, counting what it dropped.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Protocol

import numpy as np

from .devices.mic import to_slots
from .sockets import Listener

I2S_TICK = 0.003                 # how often the DMA pump wakes (in flight lasts 21+ ms)
I2S_SNDBUF = 4096                # keep the kernel's share of the DMA ring small
I2S_IN_FLIGHT = 4096             # ring bytes handed to the socket ahead of the board's reads
I2S_BLOCK = 2048                 # samples generated per numpy call (FFT-friendly)


class SampleSource(Protocol):
    """What an I2S part streams (devices/mic.py, Microphone): 24-bit samples from start_wall."""

    start_wall: float

    def block(self, n: int) -> np.ndarray: ...
    def skip(self, n: int) -> None: ...


class I2SStream:
    """Paces samples to the board over a loopback socket, as DMA fills the ring.

    Wire: raw slots host -> board; board -> host, after every socket read, the number
    of bytes it took (<I, little-endian). So the host knows exactly what the ring
    holds (handed over but unread, plus not yet handed over), drops the oldest
    samples when it would exceed `ibuf`, and keeps at most I2S_IN_FLIGHT bytes in
    the kernel, where they could no longer be dropped.
    """

    def __init__(self, mic: SampleSource | None, wall: Callable[[], float], rate: int, bits: int,
                 stereo: bool, ibuf: int, silent: Callable[[], bool]) -> None:
        self.mic, self.rate, self.bits, self.stereo = mic, rate, bits, stereo
        self._wall = wall
        self.start = mic.start_wall if mic is not None else wall()
        self.frame_bytes = (bits // 8) * (2 if stereo else 1)
        self.ibuf = max(ibuf, self.frame_bytes)
        self._silent = silent
        self.overruns = 0
        self.dropped_bytes = 0
        self._listener = Listener()
        self._closed = self._listener.closed
        self.port = self._listener.port
        self._conn: socket.socket | None = None
        self._thread = self._listener.serve(self._run, name=f"i2s-{self.port}",
                                            per_connection=False)

    def _samples(self, n: int) -> bytes:
        if self.mic is None:
            return bytes(n * self.frame_bytes)
        return to_slots(self.mic.block(n), self.bits, self.stereo)

    def _run(self, conn: socket.socket) -> None:
        """The DMA pump for the board's one connection; the stream ends with it."""
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, I2S_SNDBUF)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(False)
            self._conn = conn
            self._pump(conn)
        except (OSError, EOFError):
            pass  # the board closed its end (deinit, reset, power cut)
        finally:
            conn.close()
            self._closed.set()  # one connection per stream: accept no other

    def _pump(self, conn: socket.socket) -> None:
        wall, start = self._wall, self.start
        produced = 0            # samples released into the DMA ring so far
        pending = bytearray()   # in the ring, not yet handed to the socket
        ahead = bytearray()     # generated in efficient blocks, not yet due
        sent = consumed = 0     # bytes handed to the socket / acknowledged read by the board
        acks = bytearray()
        while not self._closed.is_set():
            acks += _drain(conn)
            while len(acks) >= 4:
                consumed += struct.unpack_from("<I", acks)[0]
                del acks[:4]
            due = int((wall() - start) * self.rate)
            backlog = due - produced
            capacity = self.ibuf // self.frame_bytes
            if backlog > capacity + I2S_BLOCK:  # far behind: skip what DMA would drop
                skip = backlog - capacity
                from_ahead = min(skip, len(ahead) // self.frame_bytes)
                del ahead[:from_ahead * self.frame_bytes]
                if self.mic:
                    self.mic.skip(skip - from_ahead)
                produced += skip
                self._overrun(skip * self.frame_bytes + len(pending))
                pending.clear()
            if due > produced:
                need = (due - produced) * self.frame_bytes
                while len(ahead) < need:
                    ahead += self._samples(I2S_BLOCK)
                if self._silent():  # unplugged: the ESP32 still clocks, SD reads 0
                    pending += bytes(need)
                else:
                    pending += ahead[:need]
                del ahead[:need]
                produced = due
            # The ring holds what the board has not read yet: in flight plus pending.
            in_flight = sent - consumed
            excess = in_flight + len(pending) - self.ibuf
            if excess > 0:  # full: the oldest samples still in our hands go
                excess = min(len(pending), -(-excess // self.frame_bytes) * self.frame_bytes)
                del pending[:excess]
                self._overrun(excess)
            room = min(self.ibuf, I2S_IN_FLIGHT) - in_flight
            if pending and room > 0:
                try:
                    n = conn.send(pending[:room])
                    del pending[:n]
                    sent += n
                except BlockingIOError:
                    pass
            self._closed.wait(I2S_TICK)

    def _overrun(self, nbytes: int) -> None:
        if nbytes > 0:
            self.overruns += 1
            self.dropped_bytes += nbytes

    def close(self) -> None:
        self._listener.close()
        if self._conn is not None:
            try:
                self._conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=2)


def _drain(conn: socket.socket) -> bytes:
    """Whatever the board sent back (its read acknowledgements); EOF when it closed."""
    data = bytearray()
    while True:
        try:
            chunk = conn.recv(4096)
        except BlockingIOError:
            return bytes(data)
        if not chunk:
            raise EOFError
        data += chunk

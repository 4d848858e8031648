"""An I2S receiver's DMA ring, fed at the sample clock over a loopback socket.

The board side (board_side/emu_machine.py, I2S) reads the socket; this end paces
the samples a part produces as the ESP32's DMA would fill its ring, and drops the
oldest when the firmware falls behind, counting what it dropped.

The ring holds frames, not `ibuf` bytes of the firmware's format: the ESP32 port
(ports/esp32/machine_i2s.c, v1.28) always receives 32-bit stereo frames into DMA
(get_dma_bits, get_dma_format: RX is I2S_DATA_BIT_WIDTH_32BIT, I2S_SLOT_MODE_STEREO)
and picks the requested format out in readinto(); it allocates
max(2, ibuf // (256 frames x 8 bytes)) DMA buffers of 256 frames. So ibuf=16384
holds 2048 frames, 42.7 ms at 48 kHz, whatever `bits` and `format` the firmware
asked for, not the 4096 mono 32-bit samples (85 ms) its bytes would suggest.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from .devices.mic import to_slots
from .sockets import Listener

I2S_TICK = 0.003                 # how often the DMA pump wakes at least (and as each DMA
                                 # buffer completes: 5.3 ms at 48 kHz, 16 ms at 16 kHz)
HOLD_S = 2.0                     # audio kept for a board that stopped reading (the kernel's
                                 # buffers and then ours); the board drops all but its ring
ACK_DROPPED = 1 << 31            # an acknowledgement of bytes the board's ring overwrote
I2S_BLOCK = 2048                 # samples generated per numpy call (FFT-friendly)
DMA_FRAME_BYTES = 8              # RX DMA frame on the ESP32: 32-bit stereo, always
DMA_BUF_FRAMES = 256             # frames per DMA buffer (DMA_BUF_LEN_IN_I2S_FRAMES)


def dma_ring_frames(ibuf: int) -> int:
    """Frames the ESP32 port's RX DMA ring holds for an `ibuf` of bytes (machine_i2s.c
    get_dma_buf_count: ESP-IDF needs at least two buffers)."""
    return max(2, ibuf // (DMA_BUF_FRAMES * DMA_FRAME_BYTES)) * DMA_BUF_FRAMES


class SampleSource(Protocol):
    """What an I2S part streams (devices/mic.py, Microphone): 24-bit samples from start_wall."""

    start_wall: float

    def block(self, n: int) -> np.ndarray: ...
    def skip(self, n: int) -> None: ...


class I2SStream:
    """Paces samples to the board over a loopback socket, as DMA fills the ring.

    Wire: raw slots host -> board, everything as soon as it is due (in whole DMA
    buffers); board -> host, after every socket read, the number of bytes it took
    (<I, little-endian), with ACK_DROPPED set for bytes it threw away unread. The
    ring's bound is kept on the board side (board_side/emu_machine.py, I2S): before
    each read it drops what the chip's DMA would have overwritten, the oldest, by
    the sample clock it shares with this end (`start_us`, the host's real-time
    clock). What is in the kernel's buffers can no
    longer be taken back from here, so a drop at this end would lose the newest
    samples, and a read after a stall would return audio older than the chip's:
    an event in it stamped late by the length of the stall. This end drops only
    beyond HOLD_S, a stall no node survives anyway.
    """

    def __init__(self, mic: SampleSource | None, wall: Callable[[], float], rate: int, bits: int,
                 stereo: bool, ibuf: int, silent: Callable[[], bool],
                 real: Callable[[], float] = time.time) -> None:
        """`wall`: the scenario's clock, which the microphone's samples follow; `real`: the
        host's real-time clock, which the ring is paced by."""
        self.mic, self.rate, self.bits, self.stereo = mic, rate, bits, stereo
        self._real = real
        start = mic.start_wall if mic is not None else wall()
        # The stream's start on the host's real-time clock. Both ends of the ring count
        # its samples by that clock: the board side reads it as time.time_ns() (at chip
        # speed its ticks run at the chip's pace, ChipClock) to drop what the DMA would
        # have overwritten. Paced by another clock here, one step of the real-time clock
        # (NTP, a VM paused and resumed) kept the board dropping every read for good.
        self.start_us = round((start + real() - wall()) * 1e6)
        self.frame_bytes = (bits // 8) * (2 if stereo else 1)
        # the ring in the firmware's bytes: its frames as readinto() hands them over
        self.ring_frames = dma_ring_frames(ibuf)
        self.ibuf = self.ring_frames * self.frame_bytes
        self._hold = int(HOLD_S * rate) * self.frame_bytes
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
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._hold)
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
        real, start, hold = self._real, self.start_us / 1e6, self._hold
        produced = 0            # samples released into the DMA ring so far
        pending = bytearray()   # due, not yet handed to the socket
        ahead = bytearray()     # generated in efficient blocks, not yet due
        sent = consumed = 0     # bytes handed to the socket / acknowledged by the board
        acks = bytearray()
        while not self._closed.is_set():
            acks += _drain(conn)
            while len(acks) >= 4:
                ack = struct.unpack_from("<I", acks)[0]
                del acks[:4]
                consumed += ack & ~ACK_DROPPED
                if ack & ACK_DROPPED:
                    self._overrun(ack & ~ACK_DROPPED)
            due = int((real() - start) * self.rate)
            due -= due % DMA_BUF_FRAMES     # the driver hands over whole DMA buffers
            backlog = due - produced
            hold_frames = hold // self.frame_bytes
            if backlog > hold_frames + I2S_BLOCK:  # far behind: skip what nobody keeps
                skip = backlog - hold_frames
                from_ahead = min(skip, len(ahead) // self.frame_bytes)
                del ahead[:from_ahead * self.frame_bytes]
                if self.mic:
                    self.mic.skip(skip - from_ahead)
                produced += skip
                self._overrun(skip * self.frame_bytes)
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
            excess = sent - consumed + len(pending) - hold
            if excess > 0:  # a board stalled for seconds: the oldest we still hold go
                excess = min(len(pending), -(-excess // self.frame_bytes) * self.frame_bytes)
                del pending[:excess]
                self._overrun(excess)
            if pending:
                try:
                    n = conn.send(pending)
                    del pending[:n]
                    sent += n
                except BlockingIOError:
                    pass
            # wake when the next DMA buffer is complete, as the chip's driver gets it
            next_due = start + (produced + DMA_BUF_FRAMES) / self.rate
            self._closed.wait(min(I2S_TICK, max(1e-4, next_due - real() + 1e-5)))

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
    """Whatever the board sent back (its read acknowledgements); EOF when it closed and
    everything it sent before is taken."""
    data = bytearray()
    while True:
        try:
            chunk = conn.recv(4096)
        except BlockingIOError:
            return bytes(data)
        if not chunk:
            if data:
                return bytes(data)  # the EOF again on the next call
            raise EOFError
        data += chunk

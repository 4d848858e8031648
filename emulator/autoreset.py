"""DevKitC auto-reset: two transistors turn DTR/RTS into EN and IO0.

    DTR RTS | EN  IO0
     0   0  | 1   1      idle (port closed, or both asserted)
     1   1  | 1   1
     0   1  | 0   1      chip held in reset
     1   0  | 1   0      IO0 low: download mode if EN rises now

On the board an RC on EN delays the chip's start by a few milliseconds after EN
rises, and the chip samples IO0 then. Over RFC 2217 each line change is a network
round trip (pyserial's client takes ~50 ms per change), so esptool's sequence
arrives stretched: the emulated RC window is widened to RELEASE_WINDOW_S, and IO0
counts as low if it was low at any moment in it. (esptool's own rfc2217 server
solves the same problem by replaying the sequence locally.)
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

RELEASE_WINDOW_S = 0.12


class AutoReset:
    def __init__(self, hold: Callable[[], None], release: Callable[[bool], None]):
        """hold(): EN went low. release(download): the chip starts, IO0 sampled.

        Both run in order on a worker thread, so a line change returns at once
        (the RFC 2217 client waits for its acknowledgement only 3 s).
        """
        self._hold = hold
        self._release = release
        self._en = True
        self._io0_low_in_window = False
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._work: queue.Queue[Callable[[], None]] = queue.Queue()
        threading.Thread(target=self._worker, name="en-io0", daemon=True).start()

    def _worker(self) -> None:
        while True:
            self._work.get()()

    def lines(self, dtr: bool, rts: bool) -> None:
        en = not (rts and not dtr)
        io0_low = dtr and not rts
        with self._lock:
            self._io0_low_in_window |= io0_low
            if en == self._en:
                return
            self._en = en
            if self._timer:
                self._timer.cancel()
                self._timer = None
            if not en:
                self._work.put(self._hold)
                return
            self._io0_low_in_window = io0_low
            self._timer = threading.Timer(RELEASE_WINDOW_S, self._out_of_reset)
            self._timer.daemon = True
            self._timer.start()

    def _out_of_reset(self) -> None:
        with self._lock:
            if not self._en:
                return
            download = self._io0_low_in_window
            self._timer = None
        self._work.put(lambda: self._release(download))

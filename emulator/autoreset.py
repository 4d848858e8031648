"""DevKitC auto-reset: two transistors turn DTR/RTS into EN and IO0.

    DTR RTS | EN  IO0
     0   0  | 1   1      idle (port closed, or both asserted)
     1   1  | 1   1
     0   1  | 0   1      chip held in reset
     1   0  | 1   0      IO0 low: download mode if EN rises now

EN has an RC delay (10 kΩ, 1 µF on the board), so the chip leaves reset a few
milliseconds after EN goes high and samples IO0 then. That is why esptool's
sequential DTR/RTS writes land in download mode on a real board, and here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

EN_RC_DELAY_S = 0.01


class AutoReset:
    def __init__(self, hold: Callable[[], None], release: Callable[[bool], None]):
        """hold(): EN went low. release(download): the chip starts, IO0 sampled."""
        self._hold = hold
        self._release = release
        self._en = True
        self._io0 = True
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def lines(self, dtr: bool, rts: bool) -> None:
        en = not (rts and not dtr)
        with self._lock:
            self._io0 = not (dtr and not rts)
            if en == self._en:
                return
            self._en = en
            if self._timer:
                self._timer.cancel()
                self._timer = None
            if not en:
                self._hold()
                return
            self._timer = threading.Timer(EN_RC_DELAY_S, self._out_of_reset)
            self._timer.daemon = True
            self._timer.start()

    def _out_of_reset(self) -> None:
        with self._lock:
            if not self._en:
                return
            download = not self._io0
        self._release(download)

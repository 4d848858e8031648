# `time` for the emulated board: ticks run from the host clock, but the wall
# clock is the board's RTC, which starts at 2000-01-01 after a power-on and
# keeps only what the firmware sets (e.g. from NTP), as on the chip.
from time import *  # noqa: ticks_ms, sleep_ms, ...
import time as _real

_EPOCH_2000 = 946684800
_offset = None


def _rtc_offset():
    global _offset
    if _offset is None:
        import emu_link, struct
        _offset = struct.unpack("<q", emu_link.call(emu_link.NVS, 6))[0]
    return _offset


def set_time(seconds):
    global _offset
    import emu_link, struct
    _offset = int(seconds) - int(_real.time())
    emu_link.call(emu_link.NVS, 7, struct.pack("<q", _offset))


def time():
    return int(_real.time()) + _rtc_offset()


def time_ns():
    return _real.time_ns() + _rtc_offset() * 1000000000


def gmtime(secs=None):
    return _real.gmtime(time() if secs is None else secs)


localtime = gmtime

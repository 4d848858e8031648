"""Situational street lighting, decided on the node, with or without the network.

The lamp's level is the first of these that applies:
1. operator: a `lamp` command's level until its minutes are up (`lamp_auto` ends it);
2. event: event_level for event_s after an impulse, while it is dark;
3. dark by the node's own lux: dark below dusk_lux, light above dawn_lux, each held
   hold_s before it counts (a headlight or a cloud does not switch the street); the
   lamp's own spill on a shielded sensor stays below dawn_lux, so it cannot switch
   itself off. In the quiet hours (local time) quiet_level, else night_level;
4. no lux reading (no light sensor, or it has failed for LUX_STALE_S): the schedule,
   dark from on_at to off_at local time; with no clock either: night_level (a dark
   street is worse than a lamp lit by day).

The level and what set it survive a reset (/data/lamp.json, written only when they
change): a node that reboots at night lights its street at once. An operator's
override keeps the minutes it had left at the last write. Settings are DEFAULTS, then
config.json's `lighting`, then what the operator changed over the air (set_lighting,
kept in /data/lighting.json).
"""

import json
import time

from node.clock import CLOCK
from node.fsutil import join, read, write_atomic

LUX_STALE_S = 600       # a lux reading older than this is no reading
DEFAULTS = {
    "dusk_lux": 20, "dawn_lux": 50, "hold_s": 60,
    "night_level": 100, "quiet_level": 40, "quiet_from": "00:00", "quiet_until": "05:00",
    "event_level": 100, "event_s": 300,
    "on_at": "18:00", "off_at": "07:00", "utc_offset_min": 0,
}
STATE = "lamp.json"
CHANGED = "lighting.json"       # the operator's set_lighting changes


def minutes(text):
    """'HH:MM' as minutes of the day."""
    h, m = text.split(":")
    h, m = int(h), int(m)
    if not (0 <= h < 24 and 0 <= m < 60):
        raise ValueError("%s is not HH:MM" % text)
    return h * 60 + m


def _within(now, start, end):
    """Whether minute-of-day `now` is in [start, end), which may wrap midnight."""
    return start <= now < end if start <= end else now >= start or now < end


class Lighting:
    def __init__(self, settings=None, base="/data", clock=CLOCK, ticks_ms=time.ticks_ms):
        self.path = join(base, STATE)
        self.changed_path = join(base, CHANGED)
        self.configured = dict(settings or {})
        try:
            changed = json.loads(read(self.changed_path))
            self._apply(changed if isinstance(changed, dict) else {})
        except (OSError, ValueError, TypeError):
            self._apply({})             # a damaged file: config.json's settings
        self.clock = clock
        self.ticks_ms = ticks_ms
        self.dark = None                # by lux: None before the first reading
        self._crossed = None            # ticks when the reading first crossed over
        self._lux_at = None
        self._event_until = None
        self._override = None           # (level, ticks it ends)
        self.level, self.source = 0, "day"
        self._restored = self._restore()

    def _apply(self, changed):
        from node.config import check_lighting
        settings = dict(self.configured)
        settings.update(changed)
        check_lighting(settings)        # ValueError (ConfigError) names the setting
        s = dict(DEFAULTS)
        s.update(settings)
        self.s, self.changed = s, changed
        self.quiet = (minutes(s["quiet_from"]), minutes(s["quiet_until"]))
        self.night = (minutes(s["on_at"]), minutes(s["off_at"]))

    def configure(self, changes):
        """The operator's set_lighting: checked (ValueError), applied, and kept across
        resets; False if it could not be kept (a full flash)."""
        changed = dict(self.changed)
        changed.update(changes)
        self._apply(changed)
        try:
            write_atomic(self.changed_path, json.dumps(changed).encode())
        except OSError:
            return False
        return True

    # --- what the node hears and is told -------------------------------------------------
    def lux(self, value):
        now = self.ticks_ms()
        self._lux_at = now
        s = self.s
        if self.dark is None:           # the first reading: as it is, no wait
            self.dark = value < s["dusk_lux"]
            return
        crossing = value > s["dawn_lux"] if self.dark else value < s["dusk_lux"]
        if not crossing:
            self._crossed = None
        elif self._crossed is None:
            self._crossed = now
        elif time.ticks_diff(now, self._crossed) >= s["hold_s"] * 1000:
            self.dark = not self.dark
            self._crossed = None

    def impulse(self):
        self._event_until = time.ticks_add(self.ticks_ms(), self.s["event_s"] * 1000)

    def override(self, level, minutes_):
        self._override = (level, time.ticks_add(self.ticks_ms(), minutes_ * 60000))

    def release(self):
        self._override = None

    # --- the decision --------------------------------------------------------------------
    def _local_minute(self):
        now = self.clock.unix_ms()
        if now is None:
            return None
        return (now // 60000 + self.s["utc_offset_min"]) % 1440

    def _is_dark(self, minute):
        now = self.ticks_ms()
        fresh = self._lux_at is not None and \
            time.ticks_diff(now, self._lux_at) < LUX_STALE_S * 1000
        if fresh and self.dark is not None:
            return self.dark, "dark"
        if minute is None:
            return True, "no clock"
        return _within(minute, self.night[0], self.night[1]), "schedule"

    def decide(self):
        """(level %, what set it); remembered across a reset when it changes."""
        now = self.ticks_ms()
        if self._override is not None and time.ticks_diff(self._override[1], now) <= 0:
            self._override = None
        if self._event_until is not None and time.ticks_diff(self._event_until, now) <= 0:
            self._event_until = None
        minute = self._local_minute()
        if self._restored and minute is None and self._lux_at is None \
                and self._override is None and self._event_until is None:
            return self.level, self.source  # just reset: as before, until lux or the clock
        self._restored = False
        dark, why = self._is_dark(minute)
        if self._override is not None:
            level, source = self._override[0], "operator"
        elif not dark:
            level, source = 0, "day" if why == "dark" else why
        elif self._event_until is not None:
            level, source = self.s["event_level"], "event"
        elif minute is not None and _within(minute, self.quiet[0], self.quiet[1]):
            level, source = self.s["quiet_level"], "quiet"
        else:
            level, source = self.s["night_level"], why
        if (level, source) != (self.level, self.source):
            self.level, self.source = level, source
            self._save()
        return level, source

    # --- across a reset ------------------------------------------------------------------
    def _save(self):
        left = None
        if self._override is not None:
            left = max(0, time.ticks_diff(self._override[1], self.ticks_ms()) // 1000)
        try:
            write_atomic(self.path, json.dumps([self.level, self.source, left]).encode())
        except OSError:
            pass                        # a full flash: the lamp still follows the rules

    def _restore(self):
        """The level before the reset; False if there was none."""
        try:
            level, source, left = json.loads(read(self.path))
        except (OSError, ValueError, TypeError):
            return False
        if not (isinstance(level, int) and 0 <= level <= 100 and isinstance(source, str)):
            return False
        self.level, self.source = level, source
        if isinstance(left, int) and left > 0 and source == "operator":
            self._override = (level, time.ticks_add(self.ticks_ms(), left * 1000))
        return True

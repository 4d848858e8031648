"""The node's street-lighting rules (firmware/node/lighting.py) on the MicroPython unix
port: the real module, its time (ticks and the synced clock) stepped by the test so that
an hour of dusk, dawn and night takes no time. On the emulated board, through the
gateway and citynode-ops: hil_tests/test_lighting.py."""

from __future__ import annotations

from citynode.testing.micropython import run_micropython_json

PRELUDE = """
import json
from node import lighting
class Time:
    def __init__(self):
        self.ms = 0
        self.unix = None        # Unix ms once 'synced'
    def ticks(self):
        return self.ms
    def unix_ms(self):
        return None if self.unix is None else self.unix + self.ms
T = Time()
def make(**settings):
    return lighting.Lighting(settings, base=BASE, clock=T, ticks_ms=T.ticks)
def step(light, seconds, lux=None):
    # `seconds` pass with a reading every 10 s (the BH1750's default interval)
    out = None
    for _ in range(max(1, seconds // 10)):
        T.ms += 10000
        if lux is not None:
            light.lux(lux)
        out = light.decide()
    return list(out)
"""


def run(tmp_path, body: str):
    return run_micropython_json(PRELUDE.replace("BASE", repr(str(tmp_path))) + body)


def test_dusk_and_dawn_switch_only_when_they_last(tmp_path):
    out = run(tmp_path, """
l = make()
r = [step(l, 10, 800)]              # daylight
r.append(step(l, 40, 5))            # a cloud, a dark minute not yet: still day
r.append(step(l, 30, 5))            # dusk held 60 s: on
r.append(step(l, 600, 15))          # night, and the lamp's own spill on the sensor
r.append(step(l, 30, 900))          # a headlight for 30 s
r.append(step(l, 70, 900))          # dawn held 60 s: off
print(json.dumps(r))
""")
    assert out == [[0, "day"], [0, "day"], [100, "dark"], [100, "dark"], [100, "dark"],
                   [0, "day"]]


def test_quiet_hours_dim_an_impulse_raises_and_both_follow_the_local_clock(tmp_path):
    out = run(tmp_path, """
l = make(quiet_from="01:00", quiet_until="05:00", utc_offset_min=60, event_s=120)
T.unix = (20000 * 86400 + 30 * 60) * 1000       # 00:30 UTC, 01:30 local
r = [step(l, 10, 2)]                             # dark at once: the first reading
l.impulse()
r.append(list(l.decide()))
r.append(step(l, 100, 2))                        # the event's 120 s not over
r.append(step(l, 30, 2))                         # over: quiet again
T.unix -= 3600 * 1000                            # an hour earlier: 00:30 local, not quiet
r.append(step(l, 10, 2))
T.unix += 12 * 3600 * 1000                       # midday, bright: an impulse lights nothing
r.append(step(l, 70, 20000))
l.impulse()
r.append(list(l.decide()))
print(json.dumps(r))
""")
    assert out == [[40, "quiet"], [100, "event"], [100, "event"], [40, "quiet"],
                   [100, "dark"], [0, "day"], [0, "day"]]


def test_the_operator_overrides_until_the_minutes_are_up(tmp_path):
    out = run(tmp_path, """
l = make()
r = [step(l, 10, 800)]
l.override(70, 2)
r.append(list(l.decide()))
r.append(step(l, 110, 800))
r.append(step(l, 20, 800))          # 2 minutes up: the rules again
l.override(30, 60)
l.release()                         # lamp_auto
r.append(list(l.decide()))
print(json.dumps(r))
""")
    assert out == [[0, "day"], [70, "operator"], [70, "operator"], [0, "day"], [0, "day"]]


def test_without_a_light_reading_the_schedule_decides_and_without_a_clock_the_lamp_is_on(
        tmp_path):
    out = run(tmp_path, """
l = make(on_at="18:30", off_at="06:45")
r = [list(l.decide())]                          # no lux, no clock: lit
T.unix = (20000 * 86400 + 12 * 3600) * 1000     # noon UTC
r.append(step(l, 10))
T.unix += 7 * 3600 * 1000                       # 19:00
r.append(step(l, 10))
r.append(step(l, 10, 900))                      # a light sensor again: it decides
r.append(step(l, 700))                          # its last reading 10 minutes old: stale
print(json.dumps(r))
""")
    assert out == [[100, "no clock"], [0, "schedule"], [100, "schedule"], [0, "day"],
                   [100, "schedule"]]


def test_a_reset_keeps_the_level_and_the_operator_s_minutes_left(tmp_path):
    out = run(tmp_path, """
import os
l = make()
step(l, 10, 2)
l.override(55, 10)
l.decide()
T.ms += 4 * 60000
l.lux(2)
l.decide()
l._save()                               # as any change writes it
T.ms = 0                                # the reset: ticks from 0, no clock yet
again = make()
r = [list(again.decide())]              # before any reading: as before the reset
r.append(step(again, 300, 2))           # 6 of its 10 minutes were left
r.append(step(again, 70, 2))
os.remove(BASE + '/lamp.json')
print(json.dumps(r))
""".replace("BASE", repr(str(tmp_path))))
    assert out == [[55, "operator"], [55, "operator"], [100, "dark"]]


def test_settings_changed_over_the_air_apply_at_once_and_outlast_a_reset(tmp_path):
    out = run(tmp_path, """
l = make(night_level=90)
r = [step(l, 10, 2)]                        # dark: config.json's night level
l.configure({"night_level": 70, "dusk_lux": 5})
r.append(list(l.decide()))
try:
    l.configure({"dawn_lux": 3})            # below dusk_lux: refused, nothing changed
except ValueError as exc:
    r.append(str(exc))
r.append([l.s["night_level"], l.s["dusk_lux"], l.s["dawn_lux"]])
again = make(night_level=90)                # after a reset, config.json as before
r.append([again.s["night_level"], again.s["dusk_lux"]])
print(json.dumps(r))
""")
    assert out[0] == [90, "dark"] and out[1] == [70, "dark"]
    assert "lighting.dawn_lux" in out[2] and "above dusk_lux" in out[2]
    assert out[3] == [70, 5, 50] and out[4] == [70, 5]

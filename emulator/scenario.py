"""The physical world around an emulated pole: light, sound, air, weather over time.

Two timelines meet here. Devices keep their own timing (conversion times, baud rate,
fan warm-up) on the *device clock*, the host's monotonic clock that the board's
ticks_ms also follows. The physics (how bright, how loud, how polluted) is read at
*scenario time*, which runs `time_scale` times faster so that a day can pass in
minutes. Both derive from one `Clock`, so tests can substitute a manual clock and
step through a day deterministically.

Everything is a pure function of (seed, parameters, scenario time): the same seed
gives the same day, on every run and every host.

A scenario file (`citynode-emu run --scenario FILE`) is a JSON object; every key is
optional (times are scenario seconds after `start`):

    {"seed": 1, "time_scale": 720, "start": "2026-04-15T00:00:00+02:00",
     "events": [{"time": 29700, "kind": "crash", "level_db": 115},
                {"time": 84600, "kind": "gunshot", "level_db": 122},
                {"time": 600, "kind": "tone", "level_db": 94, "duration": 10}],
     "episodes": [{"start": 64800, "duration": 10800, "pm25": 35}],
     "latitude": 48.2, "longitude": 16.37, "cloudiness": 0.3, "pm25_base": 8,
     "temp_mean": 14, "noise_offset_db": 0, "pinned": {"pm25": 40}}

`pinned` holds quantities at a fixed value (lux, noise_dba, pm1, pm25, pm10,
temperature, humidity, pressure, supply_volts), as Scenario.override does at run time.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol

DEFAULT_TZ = timezone(timedelta(hours=2))
DEFAULT_START = datetime(2026, 4, 15, 0, 0, 0, tzinfo=DEFAULT_TZ)

# Road-traffic noise, dB(A), for each local hour (a typical urban street).
TRAFFIC_PROFILE_DBA = (48, 45, 43, 42, 44, 52, 62, 69, 71, 68, 66, 66,
                       67, 66, 66, 67, 69, 71, 69, 65, 61, 58, 55, 51)

SPEED_OF_SOUND = 343.0           # m/s, air at 20 C
IMPULSE_KINDS = ("gunshot", "firework", "door_slam", "crash", "tone")


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class WallClock:
    """The host's monotonic clock: what the board's ticks_ms follows."""

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class ManualClock:
    """A clock that moves only when told: sleeping advances it at once."""

    def __init__(self, start: float = 1000.0) -> None:
        self._t = start
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        with self._lock:
            return self._t

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._t += max(0.0, seconds)


@dataclass(frozen=True)
class Event:
    """Something the microphone hears at a known scenario time.

    gunshot / firework / door_slam / crash: an impulse (devices/mic.py, IMPULSES);
    `level_db` is its peak sound pressure (LZpeak, dB re 20 uPa) at the microphone, or,
    for a sound with a place (`x`, `y`, metres on the street plan), 1 m from it: each
    board then hears it later and quieter by its distance (Scenario.heard).
    tone: a sine of `freq` Hz at `level_db` RMS SPL for `duration` seconds of audio,
    like an acoustic calibrator held over the microphone.
    """

    time: float
    kind: str
    level_db: float
    duration: float = 0.0
    freq: float = 1000.0
    x: float | None = None
    y: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in IMPULSE_KINDS:
            raise ValueError(f"event kind {self.kind!r}: use one of {', '.join(IMPULSE_KINDS)}")
        if (self.x is None) != (self.y is None):
            raise ValueError("an event's place needs both x and y (metres)")


@dataclass(frozen=True)
class Episode:
    """A pollution episode: PM2.5 rises by `pm25` ug/m3 with a smooth bell shape."""

    start: float
    duration: float
    pm25: float


@dataclass
class Params:
    """The scenario's knobs, with defaults for a spring day in a mid-sized European city."""

    latitude: float = 48.2
    longitude: float = 16.37
    cloudiness: float = 0.3          # 0 clear .. 1 fully overcast (mean)
    night_lux: float = 0.1           # skyglow, no lamp
    noon_lux: float = 50000.0        # clear-sky horizontal illuminance with the sun at zenith
    lamp_spill_lux: float = 15.0     # what the pole's own lamp adds at full duty
    noise_offset_db: float = 0.0     # shifts the traffic profile
    pm25_base: float = 8.0
    pm1_ratio: float = 0.7
    pm10_ratio: float = 1.6
    temp_mean: float = 14.0
    temp_amplitude: float = 6.0
    rh_mean: float = 65.0
    rh_amplitude: float = 15.0
    pressure_mean: float = 101325.0
    supply_volts: float = 5.0        # the 5 V rail, seen by the ADC through a divider


DEFAULT_EVENTS = (Event(8 * 3600 + 15 * 60, "crash", 115.0),
                  Event(23 * 3600 + 30 * 60, "gunshot", 122.0))
DEFAULT_EPISODES = (Episode(18 * 3600, 3 * 3600, 35.0),)


class Scenario:
    """Values of the simulated world at any scenario time (seconds since `start`)."""

    def __init__(self, seed: int = 0, time_scale: float = 1.0,
                 start: datetime | str | None = None,
                 events: list[Event | dict] | tuple = DEFAULT_EVENTS,
                 episodes: list[Episode | dict] | tuple = DEFAULT_EPISODES,
                 clock: Clock | None = None, pinned: dict[str, float] | None = None,
                 position: tuple[float, float] | list[float] = (0.0, 0.0),
                 **params: Any) -> None:
        """position: where this board's microphone stands (metres on the street plan)."""
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.seed = seed
        self.time_scale = float(time_scale)
        self.start = _parse_start(start)
        self.events = sorted((e if isinstance(e, Event) else Event(**e) for e in events),
                             key=lambda e: e.time)
        self.episodes = [e if isinstance(e, Episode) else Episode(**e) for e in episodes]
        x, y = position
        self.position = (float(x), float(y))
        unknown = set(params) - set(Params.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown scenario parameter(s): {', '.join(sorted(unknown))}")
        self.params = Params(**params)
        self.clock: Clock = clock or WallClock()
        self._wall0 = self.clock.monotonic()
        self._overrides: dict[str, float] = {}
        self.override(**(pinned or {}))
        rng = random.Random(seed)
        # Smooth pseudo-random wiggles: a few sinusoids per quantity, phases from the seed.
        self._wiggle = {key: [(rng.uniform(0, 2 * math.pi), period) for period in periods]
                        for key, periods in (("cloud", (1800.0, 5400.0, 17000.0)),
                                             ("noise", (300.0, 1700.0)),
                                             ("pm", (2400.0, 9000.0)),
                                             ("temp", (3600.0, 14000.0)),
                                             ("press", (20000.0, 70000.0)))}

    # -- time --------------------------------------------------------------------------
    def wall(self) -> float:
        """Device-clock seconds since the scenario began."""
        return self.clock.monotonic() - self._wall0

    def now(self) -> float:
        """Scenario seconds since `start`, advancing at time_scale x the device clock."""
        return self.at_wall(self.wall())

    def at_wall(self, wall: float) -> float:
        return wall * self.time_scale

    def unix_at(self, t: float) -> float:
        """The host's Unix time when scenario time `t` is (was) played: the truth a
        node's clock and onset stamps are measured against."""
        return time.time() + t / self.time_scale - self.wall()

    def datetime_at(self, t: float) -> datetime:
        return self.start + timedelta(seconds=t)

    def _local_hour(self, t: float) -> float:
        d = self.datetime_at(t)
        return d.hour + d.minute / 60 + (d.second + d.microsecond / 1e6) / 3600

    def _smooth(self, key: str, t: float) -> float:
        """A deterministic slow wiggle in [-1, 1]."""
        terms = self._wiggle[key]
        total = sum(math.sin(2 * math.pi * t / period + phase) for phase, period in terms)
        return total / len(terms)

    # -- overrides (tests and the control channel pin a quantity) --------------------------
    def override(self, **values: float | None) -> None:
        """Pin quantities (lux, noise_dba, pm1, pm25, pm10, temperature, humidity, pressure);
        None releases one back to the scenario's curve."""
        for name, value in values.items():
            if name not in VALUE_NAMES:
                raise ValueError(f"unknown quantity {name!r}: use one of {', '.join(VALUE_NAMES)}")
            if value is None:
                self._overrides.pop(name, None)
            else:
                self._overrides[name] = float(value)

    def _pinned(self, name: str) -> float | None:
        return self._overrides.get(name)

    # -- light -------------------------------------------------------------------------
    def sun_elevation(self, t: float) -> float:
        """Solar elevation in degrees (NOAA-style approximation, good to a fraction of a degree)."""
        utc = self.datetime_at(t).astimezone(UTC)
        day = utc.timetuple().tm_yday
        hour = utc.hour + utc.minute / 60 + utc.second / 3600
        gamma = 2 * math.pi / 365 * (day - 1 + (hour - 12) / 24)
        eqtime = 229.18 * (0.000075 + 0.001868 * math.cos(gamma) - 0.032077 * math.sin(gamma)
                           - 0.014615 * math.cos(2 * gamma) - 0.040849 * math.sin(2 * gamma))
        decl = (0.006918 - 0.399912 * math.cos(gamma) + 0.070257 * math.sin(gamma)
                - 0.006758 * math.cos(2 * gamma) + 0.000907 * math.sin(2 * gamma)
                - 0.002697 * math.cos(3 * gamma) + 0.00148 * math.sin(3 * gamma))
        solar_minutes = hour * 60 + eqtime + 4 * self.params.longitude
        hour_angle = math.radians(solar_minutes / 4 - 180)
        lat = math.radians(self.params.latitude)
        sin_el = (math.sin(lat) * math.sin(decl)
                  + math.cos(lat) * math.cos(decl) * math.cos(hour_angle))
        return math.degrees(math.asin(max(-1.0, min(1.0, sin_el))))

    def cloud_factor(self, t: float) -> float:
        """Fraction of clear-sky light that reaches the sensor (overcast variation)."""
        c = self.params.cloudiness + 0.25 * self._smooth("cloud", t)
        return 1.0 - 0.8 * min(1.0, max(0.0, c))

    def lux(self, t: float) -> float:
        """Ambient illuminance on the sensor without the pole's lamp."""
        pinned = self._pinned("lux")
        if pinned is not None:
            return pinned
        el = self.sun_elevation(t)
        p = self.params
        day = p.noon_lux * math.sin(math.radians(el)) ** 1.3 if el > 0 else 0.0
        # Twilight: about 400 lx at sunset, 3 lx at -6 deg (civil), night sky by -12 deg.
        if el >= 0:
            twilight = 400.0
        elif el > -6:
            twilight = 10 ** (2.6 + (0.5 - 2.6) * (-el / 6))
        elif el > -12:
            twilight = 10 ** (0.5 + (math.log10(p.night_lux) - 0.5) * ((-el - 6) / 6))
        else:
            twilight = p.night_lux
        light = max(day, twilight) * self.cloud_factor(t) if el > -6 else twilight
        return max(p.night_lux, light)

    # -- sound -------------------------------------------------------------------------
    def noise_dba(self, t: float) -> float:
        """Traffic noise, A-weighted equivalent level in dB(A)."""
        pinned = self._pinned("noise_dba")
        if pinned is not None:
            return pinned
        h = self._local_hour(t)
        i = int(h) % 24
        frac = h - int(h)
        base = TRAFFIC_PROFILE_DBA[i] * (1 - frac) + TRAFFIC_PROFILE_DBA[(i + 1) % 24] * frac
        return base + 1.5 * self._smooth("noise", t) + self.params.noise_offset_db

    def add_event(self, kind: str, level_db: float, after_s: float = 0.5, **kw: float) -> Event:
        """An event `after_s` device seconds from now (a bench test firing a starter pistol)."""
        event = Event(self.now() + after_s * self.time_scale, kind, float(level_db), **kw)
        self.events = sorted([*self.events, event], key=lambda e: e.time)  # one atomic swap
        return event

    def heard(self, event: Event) -> tuple[float, float]:
        """(scenario time, LZpeak dB) at which this board's microphone hears `event`: a
        sound with a place arrives after its distance at SPEED_OF_SOUND and spreads
        spherically (-6 dB per doubling; air absorption and the ground are not modelled)."""
        if event.x is None or event.y is None:
            return event.time, event.level_db
        d = max(1.0, math.hypot(event.x - self.position[0], event.y - self.position[1]))
        return (event.time + d / SPEED_OF_SOUND * self.time_scale,
                event.level_db - 20.0 * math.log10(d))

    def events_between(self, t0: float, t1: float) -> list[Event]:
        """Events starting in [t0, t1) scenario seconds."""
        return [e for e in self.events if t0 <= e.time < t1]

    # -- air ---------------------------------------------------------------------------
    def pm25(self, t: float) -> float:
        pinned = self._pinned("pm25")
        if pinned is not None:
            return pinned
        h = self._local_hour(t)
        rush = 4.0 * (math.exp(-((h - 8.0) / 1.5) ** 2) + math.exp(-((h - 17.5) / 2.0) ** 2))
        level = self.params.pm25_base + rush + 1.5 * self._smooth("pm", t)
        for ep in self.episodes:
            if ep.start <= t < ep.start + ep.duration:
                level += ep.pm25 * math.sin(math.pi * (t - ep.start) / ep.duration) ** 2
        return max(0.0, level)

    def pm(self, t: float) -> tuple[float, float, float]:
        """(PM1.0, PM2.5, PM10) in ug/m3, atmospheric."""
        pm25 = self.pm25(t)
        pm1 = self._pinned("pm1")
        pm10 = self._pinned("pm10")
        return (pm25 * self.params.pm1_ratio if pm1 is None else pm1, pm25,
                pm25 * self.params.pm10_ratio if pm10 is None else pm10)

    # -- weather -----------------------------------------------------------------------
    def _diurnal(self, t: float) -> float:
        """+1 at 15:00 local (warmest), -1 at 03:00."""
        return math.cos(2 * math.pi * (self._local_hour(t) - 15.0) / 24)

    def temperature(self, t: float) -> float:
        pinned = self._pinned("temperature")
        if pinned is not None:
            return pinned
        p = self.params
        return p.temp_mean + p.temp_amplitude * self._diurnal(t) + 0.8 * self._smooth("temp", t)

    def humidity(self, t: float) -> float:
        pinned = self._pinned("humidity")
        if pinned is not None:
            return pinned
        p = self.params
        rh = p.rh_mean - p.rh_amplitude * self._diurnal(t) - 3.0 * self._smooth("temp", t)
        return min(100.0, max(5.0, rh))

    def pressure(self, t: float) -> float:
        """Pa: the semidiurnal atmospheric tide plus slow weather drift."""
        pinned = self._pinned("pressure")
        if pinned is not None:
            return pinned
        tide = 100.0 * math.cos(2 * math.pi * (self._local_hour(t) - 10.0) / 12)
        return self.params.pressure_mean + tide + 200.0 * self._smooth("press", t)

    def supply_volts(self, t: float) -> float:
        pinned = self._pinned("supply_volts")
        return self.params.supply_volts if pinned is None else pinned

    # -- all at once ---------------------------------------------------------------------
    def values(self, t: float | None = None) -> dict[str, float]:
        t = self.now() if t is None else t
        pm1, pm25, pm10 = self.pm(t)
        return {"t": t, "lux": self.lux(t), "noise_dba": self.noise_dba(t), "pm1": pm1,
                "pm25": pm25, "pm10": pm10, "temperature": self.temperature(t),
                "humidity": self.humidity(t), "pressure": self.pressure(t),
                "supply_volts": self.supply_volts(t)}

    # -- files ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "time_scale": self.time_scale,
                "start": self.start.isoformat(),
                "events": [asdict(e) for e in self.events],
                "episodes": [asdict(e) for e in self.episodes],
                "pinned": dict(self._overrides), "position": list(self.position),
                **asdict(self.params)}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], clock: Clock | None = None) -> Scenario:
        """Build from a small mapping (e.g. a JSON file); every key is optional."""
        if not isinstance(doc, dict):
            raise ValueError("a scenario is a JSON object, e.g. {\"seed\": 1, \"time_scale\": 720}")
        return cls(clock=clock, **doc)

    @classmethod
    def load(cls, path: str | Path, clock: Clock | None = None) -> Scenario:
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read scenario {path}: {exc}") from exc
        return cls.from_dict(doc, clock)


VALUE_NAMES = ("lux", "noise_dba", "pm1", "pm25", "pm10", "temperature", "humidity",
               "pressure", "supply_volts")


def _parse_start(start: datetime | str | None) -> datetime:
    if start is None:
        return DEFAULT_START
    if isinstance(start, str):
        start = datetime.fromisoformat(start)
    if start.tzinfo is None:
        start = start.replace(tzinfo=DEFAULT_TZ)
    return start


__all__ = ["Clock", "Event", "Episode", "ManualClock", "Params", "Scenario", "WallClock"]

"""An INMP441-like I2S MEMS microphone: what the SD line carries, sample by sample.

Calibration (INMP441 datasheet; the constants and the A-weighting curve live in
citynode/acoustics.py): sensitivity -26 dBFS for a 94 dB SPL (1 Pa RMS) 1 kHz sine,
where 0 dBFS is the RMS of a sine whose peak is full scale (2^23 for the 24-bit
word). So a sine's peak in counts is 2^23 * 10^((SPL - 120) / 20), and 1 Pa RMS is
2^23 / sqrt(2) * 10^(-26/20) counts RMS. Samples are 24-bit two's complement,
left-justified in 32-bit slots (the low byte is 0).

The sound: road-traffic noise (a pink spectrum between ~40 Hz and ~10 kHz, the
scenario's dB(A) level, which is what an A-weighted meter on the node must read),
the microphone's own noise floor (33 dB(A), from its 61 dB SNR), and the
scenario's events (impulses, calibrator tones) placed at the sample whose
scenario time is the event's time. Generated with numpy in blocks; the noise is
one continuous filtered stream across blocks (overlap-save FIR).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from citynode.acoustics import FULL_SCALE, P_REF, SENSITIVITY_DBFS, a_weighting

from ..scenario import Event, Scenario
from .base import SimulatedPart, World

COUNTS_PER_PA_RMS = FULL_SCALE / math.sqrt(2) * 10 ** (SENSITIVITY_DBFS / 20)
SELF_NOISE_DBA = 33.0
FIR_TAPS = 2047



@dataclass(frozen=True)
class Shape:
    """An impulse as a microphone some tens of metres away hears it: a leading
    overpressure rising to the peak in `rise_s`, then a ringing that decays with time
    constant `decay_s` (reflections, debris), band-limited to `corner_hz` (None:
    broadband), `length_s` in all; `repeat_s`: a second, weaker report (a crash's
    secondary impacts)."""

    rise_s: float
    decay_s: float
    length_s: float
    corner_hz: float | None = None
    repeat_s: float = 0.0


# Muzzle blast: N-wave rise ~0.1-0.5 ms, broadband, gone in a few reflections. A
# firework's report (an aerial shell) is a blast too, but of a larger, slower charge,
# with a long rumble. A door slam: a panel's thud, slow and low. A vehicle crash:
# impacts and debris for about a second.
IMPULSES = {
    "gunshot": Shape(0.0003, 0.012, 0.35),
    "firework": Shape(0.0008, 0.06, 0.8, corner_hz=2500.0),
    "door_slam": Shape(0.004, 0.03, 0.3, corner_hz=300.0),
    "crash": Shape(0.004, 0.15, 1.2, corner_hz=3000.0, repeat_s=0.25),
}


def spl_to_rms_counts(spl_db: float) -> float:
    return COUNTS_PER_PA_RMS * P_REF * 10 ** (spl_db / 20)


def _traffic_fir(rate: int) -> np.ndarray:
    """Taps of a linear-phase FIR with a traffic-like spectrum, unit power gain."""
    n = 4096
    f = np.fft.rfftfreq(n, 1 / rate)
    f_safe = np.maximum(f, 1.0)
    mag = 1 / np.sqrt(f_safe)                                           # pink: -3 dB/octave
    mag *= (f_safe / 40.0) ** 2 / np.sqrt(1 + (f_safe / 40.0) ** 4)     # tyre/engine rumble starts
    mag *= 1 / np.sqrt(1 + (f_safe / min(10000.0, 0.4 * rate)) ** 4)   # air absorption, HF
    mag[0] = 0.0
    taps = np.roll(np.fft.irfft(mag, n), FIR_TAPS // 2)[:FIR_TAPS] * np.hanning(FIR_TAPS)
    return taps / np.sqrt(np.sum(taps ** 2))


def a_weighted_power_ratio(taps: np.ndarray | None, rate: int) -> float:
    """A-weighted / unweighted power of white noise through `taps` (None: white)."""
    n = 1 << 16
    f = np.fft.rfftfreq(n, 1 / rate)
    h2 = np.ones_like(f) if taps is None else np.abs(np.fft.rfft(taps, n)) ** 2
    return float(np.sum(h2 * a_weighting(f) ** 2) / np.sum(h2))


class I2SMicrophone(SimulatedPart):
    """The microphone wired to a board's I2S port. It has no state of its own: each I2S
    session hears a fresh Microphone stream from the moment the port opens (the
    receiver's clocks start), and unplugged, the SD line reads 0 (Peripherals)."""

    name = "mic"

    def __init__(self, scenario: Scenario, seed: int = 0) -> None:
        self.scenario = scenario
        self.seed = seed

    @classmethod
    def attach(cls, world: World, spec: dict[str, Any], seed: int) -> I2SMicrophone:
        return cls(world.scenario, seed)

    def stream(self, rate: int) -> Microphone:
        return Microphone(self.scenario, rate, seed=self.seed)


class Microphone:
    """One continuous stream of samples from the start of an I2S session."""

    def __init__(self, scenario: Scenario, rate: int, seed: int = 0,
                 start_wall: float | None = None) -> None:
        self.scenario = scenario
        self.rate = rate
        self.start_wall = scenario.wall() if start_wall is None else start_wall
        self.position = 0  # samples produced so far
        self._seed = seed
        self._rng = np.random.default_rng([seed, rate])
        self._taps = _traffic_fir(rate)
        self._traffic_a = math.sqrt(a_weighted_power_ratio(self._taps, rate))
        self._white_a = math.sqrt(a_weighted_power_ratio(None, rate))
        self._history = np.zeros(FIR_TAPS - 1)
        self._taps_fft: dict[int, np.ndarray] = {}
        self._waveforms: dict[Event, np.ndarray] = {}

    # -- time base ------------------------------------------------------------------------
    def scenario_time(self, sample: float) -> float:
        """Scenario time of a sample index in this stream."""
        return self.scenario.at_wall(self.start_wall + sample / self.rate)

    def sample_of(self, scenario_time: float) -> int:
        """First sample at or after a scenario time."""
        wall = scenario_time / self.scenario.time_scale
        return math.ceil((wall - self.start_wall) * self.rate - 1e-9)

    # -- generation -----------------------------------------------------------------------
    def skip(self, n: int) -> None:
        """Advance without producing (samples a DMA overrun would drop anyway)."""
        self.position += n
        self._history[:] = 0.0

    def block(self, n: int) -> np.ndarray:
        """The next n samples as 24-bit integers (int32 array, not yet shifted)."""
        k0 = self.position
        white = self._rng.standard_normal(n)
        x = np.concatenate((self._history, white))
        traffic = self._filter(x)
        self._history = x[-(FIR_TAPS - 1):]
        # Level in counts of the unweighted signal, ramped over the block from the scenario.
        lo, hi = (self._traffic_rms(self.scenario_time(k)) for k in (k0, k0 + n))
        signal = traffic * np.linspace(lo, hi, n, endpoint=False)
        floor = spl_to_rms_counts(SELF_NOISE_DBA) / self._white_a
        signal += self._rng.standard_normal(n) * floor
        self._add_events(signal, k0)
        self.position += n
        return np.clip(np.round(signal), -FULL_SCALE, FULL_SCALE - 1).astype(np.int32)

    def _filter(self, x: np.ndarray) -> np.ndarray:
        """Overlap-save FIR: the 'valid' part of x convolved with the taps."""
        nfft = 1 << (len(x) - 1).bit_length()
        spectrum = self._taps_fft.get(nfft)
        if spectrum is None:
            spectrum = self._taps_fft[nfft] = np.fft.rfft(self._taps, nfft)
        y = np.fft.irfft(np.fft.rfft(x, nfft) * spectrum, nfft)
        return y[FIR_TAPS - 1:len(x)]

    def _traffic_rms(self, t: float) -> float:
        return spl_to_rms_counts(self.scenario.noise_dba(t)) / self._traffic_a

    def _add_events(self, signal: np.ndarray, k0: int) -> None:
        n = len(signal)
        longest = max(max(shape.length_s for shape in IMPULSES.values()),
                      max((e.duration for e in self.scenario.events), default=0.0))
        t0 = self.scenario_time(k0 - longest * self.rate)
        t1 = self.scenario_time(k0 + n)
        for index, event in enumerate(self.scenario.events):
            at, level_db = self.scenario.heard(event)   # its distance from this microphone
            if not t0 <= at < t1:
                continue
            onset = self.sample_of(at)
            if event.kind == "tone":  # computed in place: a calibrator may run for hours
                length = int((event.duration or 1.0) * self.rate)
                a, b = max(onset, k0), min(onset + length, k0 + n)
                if a < b:
                    t = (np.arange(a, b) - onset) / self.rate
                    signal[a - k0:b - k0] += tone(event, t)
                continue
            wave = self._waveform(index, replace(event, level_db=level_db))
            a, b = max(onset, k0), min(onset + len(wave), k0 + n)
            if a < b:
                signal[a - k0:b - k0] += wave[a - onset:b - onset]

    def _waveform(self, index: int, event: Event) -> np.ndarray:
        """Its samples, made once (by the event: a bench test's added event shifts indices)."""
        if event not in self._waveforms:
            self._waveforms[event] = event_waveform(event, self.rate, self._seed + index)
        return self._waveforms[event]


def tone(event: Event, t: np.ndarray) -> np.ndarray:
    """A sine at the event's RMS SPL, t in seconds from its onset."""
    return math.sqrt(2) * spl_to_rms_counts(event.level_db) * np.sin(2 * math.pi * event.freq * t)


def event_waveform(event: Event, rate: int, seed: int) -> np.ndarray:
    """The event's samples in counts (float), from its onset."""
    if event.kind == "tone":
        return tone(event, np.arange(int((event.duration or 1.0) * rate)) / rate)
    shape = IMPULSES[event.kind]
    length = event.duration or shape.length_s
    rng = np.random.default_rng([seed, zlib.crc32(event.kind.encode())])
    t = np.arange(int(length * rate)) / rate
    carrier = rng.standard_normal(len(t))
    carrier *= 0.7 / np.max(np.abs(carrier))
    envelope = np.exp(-np.maximum(t - shape.rise_s, 0.0) / shape.decay_s)
    if shape.repeat_s:
        later = t >= shape.repeat_s
        envelope[later] += 0.5 * np.exp(-(t[later] - shape.repeat_s) / shape.decay_s)
    # The leading overpressure rises to the peak; the ringing decays after it.
    wave = np.where(t < shape.rise_s, t / shape.rise_s, carrier * envelope)
    wave[min(len(t) - 1, math.ceil(shape.rise_s * rate))] = 1.0
    if shape.corner_hz:     # a second-order low-pass: the sound's own spectrum
        f = np.fft.rfftfreq(2 * len(t), 1 / rate)   # zero-padded: no wrap-around
        wave = np.fft.irfft(np.fft.rfft(wave, 2 * len(t)) / (1 + 1j * f / shape.corner_hz) ** 2,
                            2 * len(t))[:len(t)]
        wave /= np.max(np.abs(wave))                # its LZpeak is still level_db
    peak_counts = COUNTS_PER_PA_RMS * P_REF * 10 ** (event.level_db / 20)  # LZpeak
    return wave * peak_counts


def to_slots(samples: np.ndarray, bits: int = 32, stereo: bool = False) -> bytes:
    """24-bit samples -> the bytes on the wire: little-endian slots, low byte 0 for 32-bit;
    stereo puts the microphone on the left and a silent right slot (L/R pin low)."""
    if bits == 32:
        words = samples.astype("<i4") << 8
    elif bits == 16:
        words = (samples >> 8).astype("<i2")
    else:
        raise ValueError("I2S slot width: 16 or 32 bits")
    if stereo:
        both = np.zeros(2 * len(words), dtype=words.dtype)
        both[0::2] = words
        words = both
    return words.tobytes()

"""Sound-level conventions the host programs share: the A-weighting curve and the
microphone's calibration.

One home so the emulated microphone (emulator/devices/mic.py), the acoustic
reference tests and any benchmark weight and scale sound the same way. The node
firmware carries its own copy for the chip (firmware/node/acoustic.py: the A-weighting
pole frequencies; firmware/drivers/mic.py: FULL_SCALE, SENSITIVITY_DBFS, the 120 dB
full-scale level), because MicroPython cannot import this module; keep the two in step.

Needs numpy (the `emu` and `dev` extras); the gateway never imports it.
"""

from __future__ import annotations

import numpy as np

# IEC 61672-1:2013, equation (E.6): the analog A-weighting's pole frequencies, Hz.
A_WEIGHTING_POLES_HZ = (20.598997, 107.65265, 737.86223, 12194.217)
# The standard's A1000: the curve is -2.000 dB at 1 kHz before this normalisation.
A1000_DB = -2.000

# An INMP441 / ICS-43434 I2S MEMS microphone: 24-bit samples, and a 1 kHz sine at
# REFERENCE_SPL reads SENSITIVITY_DBFS, where 0 dBFS is a sine peaking at full scale.
FULL_SCALE = 1 << 23
SENSITIVITY_DBFS = -26.0
REFERENCE_SPL = 94.0                           # dB SPL of the sensitivity test tone (~1 Pa)
FULL_SCALE_SPL = REFERENCE_SPL - SENSITIVITY_DBFS  # a full-scale sine: 120 dB SPL
P_REF = 20e-6                                  # Pa: 0 dB SPL


def a_weighting(f: np.ndarray | float) -> np.ndarray:
    """A-weighting magnitude at frequency f (Hz), linear, 1.0 at 1 kHz."""
    f1, f2, f3, f4 = A_WEIGHTING_POLES_HZ
    ff = np.asarray(f, dtype=float) ** 2
    ra = (f4 ** 2 * ff ** 2) / ((ff + f1 ** 2) * np.sqrt((ff + f2 ** 2) * (ff + f3 ** 2))
                                * (ff + f4 ** 2))
    return ra * 10 ** (-A1000_DB / 20)


def a_weighting_db(f: np.ndarray | float) -> np.ndarray:
    """A-weighting at frequency f (Hz) in dB, 0 dB at 1 kHz (IEC 61672-1 table values)."""
    return 20.0 * np.log10(a_weighting(f))

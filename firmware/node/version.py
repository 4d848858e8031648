"""What this firmware is, and what it needs from MicroPython (checked by provisioning)."""

VERSION = "0.1.0"
# The release the tests run against (the emulated board and the PyPI unix port), and
# what the firmware needs anyway: ROMFS (>= 1.25), str.startswith(tuple) in
# drivers/sensor.py (>= 1.25). provisioning/deploy.py reads it from here (one source).
MIN_MICROPYTHON = (1, 28, 0)

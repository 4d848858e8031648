"""What this firmware is, and what it needs from MicroPython (checked by provisioning)."""

VERSION = "0.1.0"
MIN_MICROPYTHON = (1, 24, 0)

"""Crash-loop protection: after repeated crash-reboots the node stops the app.

Every boot counts an attempt in /data/bootcrash; the app clears it once it has run
healthy for HEALTHY_S. With MAX_CRASHES attempts not cleared, main.py starts safe
mode instead of the app: the serial shell and the key stay, the last traceback is
kept in /data/lastcrash.txt and reported, and nothing else runs.
"""

import sys

from node import fsutil

COUNTER = "/data/bootcrash"
LAST_CRASH = "/data/lastcrash.txt"
MAX_CRASHES = 3
HEALTHY_S = 120


def _read_count():
    try:
        return int(fsutil.read(COUNTER) or b"0")
    except (OSError, ValueError):
        return 0


def note_boot():
    """Count this boot; True when the node should start in safe mode."""
    fsutil.makedirs("/data")
    count = _read_count() + 1
    fsutil.write_atomic(COUNTER, str(count).encode())
    return count > MAX_CRASHES


def mark_healthy():
    fsutil.write_atomic(COUNTER, b"0")


def record_crash(exc):
    """Keep the traceback of what stopped the app, for the next boot to report."""
    try:
        fsutil.makedirs("/data")
        with open(LAST_CRASH, "w") as f:
            sys.print_exception(exc, f)
    except OSError:
        pass


def last_crash():
    try:
        return (fsutil.read(LAST_CRASH) or b"").decode()
    except OSError:
        return ""

"""Small file helpers shared by keys and seqno: power-cut-safe writes, and room for them.

A file is replaced by writing `<path>.tmp` and renaming it over `<path>`:
LittleFS (the ESP32 default) and POSIX make the rename atomic, FAT's driver in
MicroPython replaces the target too. A reader sees the old or the new content,
never half of one; a leftover .tmp from a cut is simply overwritten next time.

A full filesystem must not stop the node: the few small writes it cannot do without
(sequence numbers, the replay guard, the crash count) would fail first. So the node
keeps RESERVE_BYTES in a file it gives up when a write finds no room (write_atomic
then tries once more), and reports the filesystem full until it can keep it again.
"""

import os

ENOSPC = 28
RESERVE = "/data/reserve"
RESERVE_BYTES = 8192


def join(base, name):
    if not base:
        return name
    return base + name if base.endswith("/") else base + "/" + name


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def makedirs(path):
    """Create `path` and its parents if missing (MicroPython has no os.makedirs)."""
    if not path or exists(path):
        return
    head = path.rstrip("/")
    cut = head.rfind("/")
    if cut > 0:
        makedirs(head[:cut])
    try:
        os.mkdir(head)
    except OSError:
        if not exists(head):
            raise


def read(path):
    """The file's bytes, or None if it does not exist (other I/O errors raise)."""
    if not exists(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def write_atomic(path, data):
    try:
        _replace(path, data)
    except OSError as exc:
        if exc.errno != ENOSPC or not give_up_reserve():
            raise
        _replace(path, data)


def _replace(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def give_up_reserve():
    """Free the reserve for an essential write; False when it was already gone."""
    try:
        os.remove(RESERVE)
        return True
    except OSError:
        return False


def keep_reserve():
    """Make the reserve if it is missing and there is room; True when it is in place
    (False: the filesystem is full, which the node reports)."""
    if exists(RESERVE):
        return True
    try:
        makedirs(RESERVE[:RESERVE.rfind("/")])
        with open(RESERVE, "wb") as f:
            chunk = bytes(512)
            for _ in range(RESERVE_BYTES // 512):
                f.write(chunk)
        return True
    except OSError:
        try:
            os.remove(RESERVE)   # a part written before the room ran out
        except OSError:
            pass
        return False

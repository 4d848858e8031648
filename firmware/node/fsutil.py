"""Small file helpers shared by keys and seqno: power-cut-safe writes.

A file is replaced by writing `<path>.tmp` and renaming it over `<path>`:
LittleFS (the ESP32 default) and POSIX make the rename atomic, FAT's driver in
MicroPython replaces the target too. A reader sees the old or the new content,
never half of one; a leftover .tmp from a cut is simply overwritten next time.
"""

import os


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
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)

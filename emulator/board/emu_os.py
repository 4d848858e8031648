# `os` for the emulated board: the unix port's VfsPosix, made to look like the
# ESP32's littlefs: ilistdir gives sizes and statvfs the vfs partition's blocks.
from os import *  # noqa
import os as _real

_BLOCK = 4096
_VFS_BYTES = 2 * 1024 * 1024


def ilistdir(path="."):
    for entry in _real.ilistdir(path):
        name, kind, inode = entry[0], entry[1], entry[2]
        size = 0
        if kind == 0x8000:
            size = _real.stat((path.rstrip("/") + "/" if path not in ("", ".") else "") + name)[6]
        yield (name, kind, inode, size)


def _used(path):
    total = 0
    for name, kind, _, size in ilistdir(path):
        total += (size + _BLOCK - 1) // _BLOCK
        if kind == 0x4000:
            total += _used(path.rstrip("/") + "/" + name)
    return total


def statvfs(path="/"):
    blocks = _VFS_BYTES // _BLOCK
    free = max(0, blocks - _used("/"))
    return (_BLOCK, _BLOCK, blocks, free, free, 0, 0, 0, 0, 255)

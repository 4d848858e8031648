# `os` for the emulated board: the unix port's VfsPosix, made to look like the
# ESP32's littlefs: ilistdir gives sizes, statvfs the vfs partition's blocks, rename
# works between absolute paths, and at chip speed what changes a directory costs the
# flash's time (emu_lfs).
from os import *  # noqa
import os as _real
from emu_lfs import absolute as _absolute, metadata as _metadata

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


def remove(path):
    _metadata(_real.remove, path)


def mkdir(path):
    _metadata(_real.mkdir, path)


def rmdir(path):
    _metadata(_real.rmdir, path)


def rename(old, new):
    _metadata(_rename, old, new)


def _rename(old, new):
    # The unix port's VfsPosix mounted at / fails to rename between absolute paths
    # (ENOENT); littlefs on the chip does not. Rename from the root, relatively.
    old, new = _absolute(old), _absolute(new)
    cwd = _real.getcwd()
    _real.chdir("/")
    try:
        _real.rename(old[1:], new[1:])
    finally:
        _real.chdir(cwd)

# The ESP32's littlefs on its SPI flash, timed. On the chip a write to the filesystem
# holds the calling task while the flash programs, and an erase (a 4 KB sector) holds it
# for ~45 ms with the flash cache off; the unix port's files cost a system call. At chip
# speed every write, close, rename and remove here is charged what littlefs would ask of
# the flash (emu_drivers: the chip's time, not the VM's CPU x the factor). A cost model,
# not littlefs itself: MicroPython's VfsLfs2 defaults (extmod/vfs_lfsx.c: read and prog
# size 32, a 128-byte cache, so files up to 128 bytes live inline in their directory's
# metadata), 4 KB blocks, copy-on-write. Datasheet figures of the 4 MB parts on WROOM
# modules (W25Q32JV, GD25Q32): sector erase 45 ms typical (400 ms at most), a program
# 30 us plus 2.5 us a byte. Reads are not charged.
import builtins
import os as _real      # imported by emu_os before it stands in for os: the unix port's
from emu_link import driver_begin as begin, driver_end as end

_AT = _real.getenv("CITYNODE_CHIP_DRIVERS")     # the drivers' marks count (chip speed)

BLOCK = 4096
CACHE = 128             # littlefs's cache: data is programmed in runs of this many bytes
INLINE_MAX = CACHE      # a file this small is stored in its directory's metadata
ERASE_NS = 45000000
PROG_NS = 30000
PROG_BYTE_NS = 2500
TAGS = 32               # what a metadata commit writes besides inline data (tags, CRC)
LIVE = 512              # a directory's metadata after compaction
_CHARGE_MAX_NS = 1000000000     # chipclock.c's model field is 32-bit: charge in parts

_open = builtins.open
_dirs = {}              # directory: bytes written into its metadata block so far


def _prog(nbytes):
    return PROG_NS + PROG_BYTE_NS * nbytes if nbytes else 0


def _dir(path):
    return path[:path.rfind("/") + 1]


def _commit(path, inline=0):
    """A metadata commit in `path`'s directory; compaction (an erase) when its block fills."""
    d = _dir(path) or "/"
    n = (TAGS + inline + 31) // 32 * 32
    used = _dirs.get(d, BLOCK // 2) + n     # a directory met first: its block half full
    ns = _prog(n)
    if used > BLOCK:
        ns += ERASE_NS + _prog(LIVE)
        used = LIVE + n
    _dirs[d] = used
    return ns


def _end(ns):
    """Close the mark begin() opened: the work between costs the chip `ns`."""
    part = min(ns, _CHARGE_MAX_NS)
    end(part)
    ns -= part
    while ns > 0:
        part = min(ns, _CHARGE_MAX_NS)
        begin()
        end(part)
        ns -= part


def _blocks(size):
    return (size + BLOCK - 1) // BLOCK


def _size(path):
    try:
        return _real.stat(path)[6]
    except OSError:
        return None


class FlashFile:
    """A file open for writing: the file's own methods, each charged its flash work."""

    def __init__(self, f, path, mode, before):
        """`before`: the file's size before it was opened, None if it did not exist."""
        self._f = f
        self._path = path
        self._size = 0 if before is None or "w" in mode else before
        self._inline = self._size <= INLINE_MAX
        self._fresh = True      # no block written in this session yet (append: copy the tail)
        self._cached = 0

    def _flash_ns(self, n):
        """What writing n more bytes asks of the flash: a fresh (erased) block for every
        block the file's chain grows by, the cache programmed each time it fills."""
        at = self._size
        self._size = at + n
        if self._inline:
            if self._size <= INLINE_MAX:
                return 0                # in RAM until the close commits it
            self._inline = self._fresh = False
            ns = _prog(at)              # outlined: the inline bytes go to the first block
            start = 0
        elif self._fresh:
            self._fresh = False         # appending: its last block is copied to a fresh one
            tail = at % BLOCK
            ns = _prog(tail) if tail else 0
            start = at - tail
        else:
            ns = 0
            start = at
        ns += ERASE_NS * (_blocks(self._size) - _blocks(start))
        cached = self._cached + n
        ns += (cached // CACHE) * _prog(CACHE)
        self._cached = cached % CACHE
        return ns

    def write(self, data):
        begin()
        ns = 0
        try:
            n = self._f.write(data)
            ns = self._flash_ns(n or 0)
        finally:
            _end(ns)
        return n

    def close(self):
        if self._f is None:
            return
        begin()
        ns = 0
        try:
            self._f.close()
            self._f = None
            ns = _commit(self._path, self._size if self._inline else 0)
            if not self._inline:
                ns += _prog(self._cached)
        finally:
            _end(ns)

    def flush(self):
        self._f.flush()

    def seek(self, *args):
        return self._f.seek(*args)

    def tell(self):
        return self._f.tell()

    def read(self, *args):
        return self._f.read(*args)

    def readinto(self, *args):
        return self._f.readinto(*args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def absolute(path):
    if path.startswith("/"):
        return path
    cwd = _real.getcwd()
    return (cwd.rstrip("/") + "/" + path) if cwd != "/" else "/" + path


def open(path, mode="r", *args, **kw):
    if "r" in mode and "+" not in mode:
        return _open(path, mode, *args, **kw)
    begin()
    ns = 0
    try:
        path = absolute(path)
        before = _size(path)
        f = FlashFile(_open(path, mode, *args, **kw), path, mode, before)
        if before is None:
            ns = _commit(path)      # a new entry in its directory
    finally:
        _end(ns)
    return f


def metadata(op, path, *args):
    """op(path, *args): a rename, remove, mkdir or rmdir, one commit in the directory of
    `path` (a rename across directories: two)."""
    if not _AT:
        return op(path, *args)
    begin()
    ns = 0
    try:
        result = op(path, *args)
        path = absolute(path)
        ns = _commit(path)
        if args and _dir(absolute(args[0])) != _dir(path):
            ns += _commit(absolute(args[0]))
    finally:
        _end(ns)
    return result


def install():
    """At chip speed only (the drivers' marks count nothing otherwise)."""
    if _AT:
        builtins.open = open

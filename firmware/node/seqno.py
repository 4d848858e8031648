"""Sequence numbers that never repeat, and the boot counter.

The gateway refuses a (device, seq) it has seen, so a repeat after a reset
would lose data. The state file `<base>/seq` holds "limit boot": every number
below `limit` may already have been used. Numbers are handed out from RAM; when
a block of BLOCK numbers is used up, the next limit is written (tmp + rename)
*before* any number of the new block leaves, so flash is written once per block
and a power cut at any point restarts above everything handed out. A reset wastes
at most one block of numbers, which is harmless: only uniqueness and order matter.

Opening a Sequence counts a boot and reserves the first block in one write.

Highest keeps the highest accepted downlink command seq, so a replayed
command is refused even after a reset.
"""

from node.fsutil import join, makedirs, read, write_atomic

BLOCK = 64
STATE = "seq"


def _parse(raw):
    try:
        parts = raw.decode().split()
        limit, boot = int(parts[0]), int(parts[1])
    except (ValueError, IndexError, UnicodeError):
        raise ValueError("sequence state file is damaged: %r" % raw)
    if limit < 0 or boot < 0:
        raise ValueError("sequence state file is damaged: %r" % raw)
    return limit, boot


class Sequence:
    """next() -> the next sequence number; .boot -> this boot's count (1 on the first boot)."""

    def __init__(self, base="/data", block=BLOCK):
        if block < 1:
            raise ValueError("block must be >= 1")
        self.block = block
        self.path = join(base, STATE)
        makedirs(base)
        raw = read(self.path)
        limit, boot = _parse(raw) if raw is not None else (0, 0)
        self.boot = boot + 1
        self._next = limit
        self._limit = limit
        self._reserve()

    def _reserve(self):
        limit = self._next + self.block
        write_atomic(self.path, b"%d %d\n" % (limit, self.boot))
        self._limit = limit

    def next(self):
        if self._next >= self._limit:
            self._reserve()
        n = self._next
        self._next = n + 1
        return n

    def peek(self):
        """The number next() will return (nothing is reserved or used)."""
        return self._next


class Highest:
    """The highest number accepted so far, persisted in `<base>/<name>` (replay guard)."""

    def __init__(self, base="/data", name="cmdseq"):
        self.path = join(base, name)
        makedirs(base)
        raw = read(self.path)
        if raw is None:
            self.value = -1
        else:
            try:
                self.value = int(raw.decode())
            except (ValueError, UnicodeError):
                raise ValueError("%s is damaged: %r" % (self.path, raw))

    def accept(self, n):
        """True (and stored before returning) if n is above every number accepted before."""
        if n <= self.value:
            return False
        write_atomic(self.path, b"%d\n" % n)
        self.value = n
        return True

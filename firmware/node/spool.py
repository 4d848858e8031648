"""Offline spool: what the uplink could not send yet, oldest first, bounded, power-cut safe.

New records go to a RAM ring; when it is full (or flush() is called, e.g. after
a while offline) the whole ring is appended to a flash file in one write, so
flash is written once per batch, not per reading. Flash records are always
older than RAM ones, so the drain order is flash (from the head) then RAM, except
that an event (priority EVENT) in RAM goes before everything: an impulse must not
wait for an hour of spooled windows. An event that reached flash in an outage keeps
its place there.

Flash: `<base>/spool.dat`, append-only records `<H len><B prio><I crc32>` +
data (the CRC covers len, prio and data), and `<base>/spool.hd` with the byte
offset of the oldest unsent record, rewritten atomically every `head_every`
pops, so a reset re-sends at most that many (identical bytes; the gateway
dedupes on seq) and never skips one. At open the file is checked from the
head; the first short or bad record (a write torn by a power cut) and all
after it are dropped, everything before kept, and counted in `.torn`.
When the file is fully sent it is deleted (head file first, so a cut between
the two can only re-send, never point into a new file).

Full (RAM + flash over `flash_bytes`): the oldest routine record goes first,
events (priority EVENT) only when nothing routine is left; each drop counts in
`.dropped`. Dropping from the middle of the file means rewriting it (tmp +
rename), which happens only while the spool is full. If flash fails (e.g. the
filesystem is full) records stay in RAM, bounded the same way.
"""

import os
import struct
import time
from binascii import crc32

from node.fsutil import exists, join, makedirs, read, write_atomic

ROUTINE = 0
EVENT = 1
HDR = 7
DATA = "spool.dat"
HEAD = "spool.hd"
_CHUNK = 256


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


class Spool:
    """put/peek/pop (or sent), len(); counters .dropped .torn .writes .flash_errors; bytes_used()."""

    def __init__(self, base="/data/spool", *, ram_count=16, ram_bytes=4096, flash_bytes=65536,
                 max_record=4096, head_every=16):
        self.base = base
        self.ram_count = ram_count
        self.ram_bytes = ram_bytes
        self.flash_bytes = flash_bytes if base else 0
        self.max_record = max_record
        self.head_every = head_every
        self.dropped = 0
        self.torn = 0
        self.writes = 0
        self.flash_errors = 0
        self.last_error = None
        self._ram = []  # [prio, bytes], oldest first
        self._ram_used = 0
        self._since = 0  # ticks_ms when the oldest RAM record came in
        self._buf = bytearray(_CHUNK)
        self._reset_flash()
        if self.flash_bytes:
            self._dat = join(base, DATA)
            self._hd = join(base, HEAD)
            makedirs(base)
            self._open()

    # --- sizes ------------------------------------------------------------------------
    def __len__(self):
        return self._count + len(self._ram)

    def bytes_used(self):
        """Bytes held, headers included (flash live part + RAM)."""
        return self._end - self._head + self._ram_used

    def ram_len(self):
        """Records only in RAM (lost on a reset until flushed)."""
        return len(self._ram)

    # --- put / peek / pop ---------------------------------------------------------------
    def put(self, data, priority=ROUTINE):
        """Queue one record (bytes copied); spills the RAM ring to flash when it is full."""
        if len(data) > self.max_record:
            raise ValueError("record of %d bytes is over max_record (%d)"
                             % (len(data), self.max_record))
        if not self._ram:
            self._since = time.ticks_ms()
        self._ram.append([priority, bytes(data)])
        self._ram_used += HDR + len(data)
        if len(self._ram) > self.ram_count or self._ram_used > self.ram_bytes:
            if not self.flush():
                self._trim_ram()

    def _event_in_ram(self):
        """Index of the oldest event in RAM, or -1."""
        ram = self._ram
        for i in range(len(ram)):
            if ram[i][0] == EVENT:
                return i
        return -1

    def peek(self):
        """The next record's bytes (an event in RAM, else the oldest), or None when empty;
        it stays queued."""
        i = self._event_in_ram()
        if i >= 0:
            return self._ram[i][1]
        if self._count and self._read_head():
            return self._cache[2]
        return self._ram[0][1] if self._ram else None

    def pop(self):
        """Remove and return the record peek() gives (None when empty)."""
        i = self._event_in_ram()
        if i >= 0:
            return self._pop_ram(i)
        if self._count and self._read_head():
            return self._pop_head()
        return self._pop_ram(0) if self._ram else None

    def sent(self, data):
        """Remove `data`, a record peek() gave, once it is sent: by identity, as an event
        may have come in ahead of it meanwhile (pop() would take the event, unsent), and
        only if still queued (a full spool may have dropped it). In flash by its bytes:
        at the head, where a flush moved it from RAM. True if removed."""
        ram = self._ram
        for i in range(len(ram)):
            if ram[i][1] is data:
                self._pop_ram(i)
                return True
        if self._count and self._read_head() and self._cache[2] == data:
            self._pop_head()
            return True
        return False

    def flush(self, max_age_ms=None):
        """Write the RAM ring to flash in one append (with max_age_ms: only once its oldest
        record is that old). True if written. Also saves a moved head, so call it without
        max_age_ms before a planned reset."""
        if not self.flash_bytes:
            return False
        if max_age_ms is not None and (not self._ram or time.ticks_diff(
                time.ticks_ms(), self._since) < max_age_ms):
            return False
        if self._unsaved and self._count:
            self._save_head()
        if not self._ram:
            return False
        try:
            if self._size() != self._end:  # a failed append left bytes behind: repair first
                before = self._count
                self._open()
                self.dropped += max(0, before - self._count)
            self._make_room(self._ram_used)
            if not self._ram:
                return False
            with open(self._dat, "ab") as f:
                for prio, data in self._ram:
                    f.write(self._header(prio, data))
                    f.write(data)
            self.writes += 1
        except OSError as e:  # records stay in RAM (bounded); the file is checked next time
            self._flash_error(e)
            return False
        self._end += self._ram_used
        self._count += len(self._ram)
        self._ram = []
        self._ram_used = 0
        return True

    # --- flash internals ---------------------------------------------------------------
    def _reset_flash(self):
        self._head = 0
        self._end = 0
        self._count = 0
        self._unsaved = 0
        self._cache = None

    def _size(self):
        try:
            return os.stat(self._dat)[6]
        except OSError:
            return 0

    @staticmethod
    def _header(prio, data):
        head = struct.pack("<HB", len(data), prio)
        return head + struct.pack("<I", crc32(data, crc32(head)) & 0xFFFFFFFF)

    def _check(self, f, off):
        """(prio, size with header) of the valid record at `off`, or None if short/bad."""
        f.seek(off)
        hdr = f.read(HDR)
        if len(hdr) < HDR:
            return None
        n, prio, want = struct.unpack("<HBI", hdr)
        if n > self.max_record:
            return None
        crc = crc32(hdr[:3])
        mv = memoryview(self._buf)
        left = n
        while left:
            k = f.readinto(mv[:min(left, _CHUNK)])
            if not k:
                return None
            crc = crc32(mv[:k], crc)
            left -= k
        return (prio, HDR + n) if crc & 0xFFFFFFFF == want else None

    def _open(self):
        """Load the head, check every record after it, cut a torn tail."""
        self._reset_flash()
        try:
            size = os.stat(self._dat)[6]
        except OSError:
            _remove(self._hd)
            return
        raw = read(self._hd)
        try:
            head = int(raw) if raw else 0
        except ValueError:
            head = 0  # a damaged head file: re-send everything rather than lose anything
        pos = head if 0 <= head <= size else 0
        with open(self._dat, "rb") as f:
            while pos < size:
                rec = self._check(f, pos)
                if rec is None:
                    break
                pos += rec[1]
                self._count += 1
        self._head = head if 0 <= head <= size else 0
        self._end = pos
        if pos < size:
            self.torn += 1
            self._rewrite(set())
        elif not self._count:
            self._delete_flash()

    def _scan(self, f):
        """(offset, prio, size) of each live record, from the headers, one at a time:
        a full 64 KB file holds hundreds of records, too many to list on the heap."""
        off = self._head
        while off < self._end:
            f.seek(off)
            n, prio = struct.unpack("<HB", f.read(3))
            yield off, prio, HDR + n
            off += HDR + n

    def _make_room(self, incoming):
        """Before appending `incoming` bytes: reclaim the sent prefix, drop if still full."""
        if self._end + incoming <= self.flash_bytes:
            return
        need = self._end - self._head + incoming - self.flash_bytes
        drop = set()  # offsets of the (few) flash records to drop
        for want in (ROUTINE, EVENT):  # oldest routine first, events last
            if need > 0 and self._count:
                with open(self._dat, "rb") as f:
                    for off, prio, size in self._scan(f):
                        if need <= 0:
                            break
                        if prio == want and off not in drop:
                            drop.add(off)
                            need -= size
            i = 0
            while need > 0 and i < len(self._ram):
                if self._ram[i][0] == want:
                    need -= self._drop_ram(i)
                else:
                    i += 1
        if self._count:
            self._rewrite(drop)

    def _trim_ram(self):
        """RAM over its bounds and no flash to spill to: drop the oldest routine record."""
        while len(self._ram) > self.ram_count or self._ram_used > self.ram_bytes:
            i = 0
            while i < len(self._ram) and self._ram[i][0] != ROUTINE:
                i += 1
            self._drop_ram(i if i < len(self._ram) else 0)

    def _pop_ram(self, i):
        data = self._ram.pop(i)[1]
        self._ram_used -= HDR + len(data)
        return data

    def _drop_ram(self, i):
        self.dropped += 1
        return HDR + len(self._pop_ram(i))

    def _rewrite(self, drop):
        """Copy live records (minus `drop` offsets) to a new file; head becomes 0."""
        tmp = self._dat + ".tmp"
        count = 0
        end = 0
        mv = memoryview(self._buf)
        with open(self._dat, "rb") as src, open(tmp, "wb") as dst:
            for off, prio, size in self._scan(src):
                if off in drop:
                    self.dropped += 1
                    continue
                src.seek(off)
                left = size
                while left:
                    k = src.readinto(mv[:min(left, _CHUNK)])
                    dst.write(mv[:k])
                    left -= k
                count += 1
                end += size
        _remove(self._hd)  # a cut before the rename re-sends the old file from 0: no loss
        os.rename(tmp, self._dat)
        self.writes += 1
        self._reset_flash()
        self._end = end
        self._count = count
        if not count:
            self._delete_flash()

    def _pop_head(self):
        """The flash head record (loaded by _read_head), removed."""
        off, size, data = self._cache
        self._cache = None
        self._head = off + size
        self._count -= 1
        self._unsaved += 1
        if not self._count:
            self._delete_flash()
        elif self._unsaved >= self.head_every:
            self._save_head()
        return data

    def _read_head(self):
        """Load the flash head record into ._cache; False if it went bad (flash is cut)."""
        c = self._cache
        if c is None or c[0] != self._head:
            try:
                with open(self._dat, "rb") as f:
                    rec = self._check(f, self._head)
                    if rec is not None:
                        f.seek(self._head + HDR)
                        self._cache = (self._head, rec[1], f.read(rec[1] - HDR))
            except OSError as e:  # the file is gone or unreadable
                self._flash_error(e)
                rec = None
            if rec is None:  # damaged since it was checked: drop from here, never loop on it
                self.torn += 1
                self.dropped += self._count
                self._delete_flash()
                return False
        return True

    def _save_head(self):
        try:
            write_atomic(self._hd, b"%d\n" % self._head)
        except OSError as e:  # only costs re-sends after a reset: go on, try next time
            self._flash_error(e)
            return
        self.writes += 1
        self._unsaved = 0

    def _flash_error(self, e):
        self.flash_errors += 1
        self.last_error = "spool flash: %r" % (e,)

    def _delete_flash(self):
        if exists(self._hd) or exists(self._dat):
            _remove(self._hd)
            _remove(self._dat)
            self.writes += 1
        self._reset_flash()


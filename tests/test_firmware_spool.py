"""The offline spool (firmware/node/spool.py) on the MicroPython unix port (110 KB heap).

Each test runs real MicroPython against a temporary folder that stands for the
node's flash; a "reset" is a fresh MicroPython process opening the same folder,
and a power cut mid-write is a file truncated or damaged on the host.
"""

from __future__ import annotations

import os
from pathlib import Path

from citynode.provisioning.device import last_json
from citynode.testing.micropython import run_micropython

PRELUDE = """
import json
from node.spool import Spool, ROUTINE, EVENT
import node.spool as _sp
opened = []
_open = open
def counting_open(path, mode='r'):
    if 'w' in mode or 'a' in mode:
        opened.append(path)
    return _open(path, mode)
_sp.open = counting_open
import node.fsutil
node.fsutil.open = counting_open
def rec(i, n=100):
    return (b'r%05d' % i) + b'.' * (n - 6)
def drain(s):
    out = []
    while len(s):
        assert s.peek() == s.peek()
        out.append(s.pop().decode()[:6])
    assert s.pop() is None and s.peek() is None
    return out
def report(**kw):
    print(json.dumps(kw))
"""


def mpy(tmp: Path, code: str) -> dict:
    out = run_micropython(PRELUDE + f"BASE = {str(tmp / 'spool')!r}\n" + code)
    return last_json(out)


def names(*idx) -> list[str]:
    return [f"r{i:05d}" for i in idx]


def test_oldest_first_across_ram_and_flash(tmp_path):
    got = mpy(tmp_path, """
s = Spool(BASE, ram_count=8, ram_bytes=4096, flash_bytes=65536)
for i in range(50):
    s.put(rec(i))
n, ram, used = len(s), s.ram_len(), s.bytes_used()
first = drain(s)
for i in range(50, 53):
    s.put(rec(i))
report(n=n, ram=ram, used=used, order=first + drain(s), dropped=s.dropped)
""")
    assert got["n"] == 50 and 0 < got["ram"] <= 8
    assert got["used"] == 50 * 107  # 7-byte header per record
    assert got["order"] == names(*range(53))
    assert got["dropped"] == 0
    assert not (tmp_path / "spool" / "spool.dat").exists()  # drained: the file is gone
    assert not (tmp_path / "spool" / "spool.hd").exists()


def test_full_spool_drops_the_oldest_routine_records_and_counts_them(tmp_path):
    got = mpy(tmp_path, """
s = Spool(BASE, ram_count=4, ram_bytes=4096, flash_bytes=2000)
for i in range(60):
    s.put(rec(i), EVENT if i % 10 == 3 else ROUTINE)
    assert s.bytes_used() <= 2000 + 4 * 107, s.bytes_used()
report(n=len(s), dropped=s.dropped, order=drain(s))
""")
    order = got["order"]
    events = names(3, 13, 23, 33, 43, 53)
    assert all(e in order for e in events)  # events are kept longest
    assert got["dropped"] == 60 - got["n"] > 0
    routine = [r for r in order if r not in events]
    assert routine == sorted(routine)  # what is left is still oldest first (events jump)
    last = int(routine[0][1:])
    assert routine == names(*[i for i in range(last, 60) if i % 10 != 3])  # the newest kept


def test_an_event_jumps_the_backlog(tmp_path):
    # an hour offline spooled to flash; back online, an impulse: its event goes next
    got = mpy(tmp_path, """
s = Spool(BASE, ram_count=8, ram_bytes=4096, flash_bytes=65536)
for i in range(40):
    s.put(rec(i))
first = [s.pop().decode()[:6] for _ in range(3)]
s.put(rec(40))
s.put(rec(41), EVENT)
s.put(rec(42), EVENT)
report(order=first + drain(s))
""")
    assert got["order"] == names(0, 1, 2, 41, 42, *range(3, 41))


def test_a_record_sent_while_an_event_came_in_leaves_once(tmp_path):
    # a window in flight (peeked, not yet acknowledged) when an impulse comes in: the
    # acknowledgement removes the window, not the event ahead of it now (in the field the
    # window went out twice); one flushed to flash while in flight leaves from there
    got = mpy(tmp_path, """
s = Spool(BASE, ram_count=8, ram_bytes=4096, flash_bytes=65536)
s.put(rec(0))
s.put(rec(1))
window = s.peek()
s.put(rec(2), EVENT)
removed = s.sent(window)
again = s.sent(window)
event = s.pop().decode()[:6]
moved = s.peek()
s.flush()
in_flash = s.sent(moved)
for i in range(3, 20):
    s.put(rec(i))   # the RAM ring over its bounds: to flash, dropping none
report(removed=removed, again=again, in_flash=in_flash, order=[event] + drain(s))
""")
    assert got["removed"] is True and got["again"] is False
    assert got["in_flash"] is True
    assert got["order"] == names(2, *range(3, 20))


def test_only_events_left_then_the_oldest_event_goes(tmp_path):
    got = mpy(tmp_path, """
s = Spool(BASE, ram_count=2, ram_bytes=4096, flash_bytes=1000)
for i in range(20):
    s.put(rec(i), EVENT)
report(n=len(s), dropped=s.dropped, order=drain(s))
""")
    # the newest kept (those in RAM sent before those in flash: events jump)
    assert sorted(got["order"]) == names(*range(20 - got["n"], 20))
    assert got["dropped"] == 20 - got["n"] > 0


def test_ram_only_spool_is_bounded_too(tmp_path):
    got = mpy(tmp_path, """
s = Spool(None, ram_count=5, ram_bytes=4096)
for i in range(12):
    s.put(rec(i), EVENT if i == 1 else ROUTINE)
report(dropped=s.dropped, order=drain(s))
""")
    assert got == {"dropped": 7, "order": names(1, 8, 9, 10, 11)}


def test_survives_a_restart_resending_at_most_head_every(tmp_path):
    mpy(tmp_path, """
s = Spool(BASE, ram_count=8, head_every=4)
for i in range(30):
    s.put(rec(i))
s.flush()
for i in range(6):
    s.pop()       # 0..5 sent; the head was saved after 4
report(n=len(s))
""")
    # reset without flush: records 4 and 5 come again (identical bytes), none is skipped
    got = mpy(tmp_path, "s = Spool(BASE, ram_count=8, head_every=4)\n"
                        "report(n=len(s), first=s.pop().decode()[:6], torn=s.torn)\n"
                        "s.flush()\n")
    assert got == {"n": 26, "first": "r00004", "torn": 0}
    # flush() saved the head: after the next reset the order goes on from r00005
    got = mpy(tmp_path, "s = Spool(BASE)\nreport(order=drain(s))\n")
    assert got["order"] == names(*range(5, 30))


def test_a_torn_tail_is_dropped_and_the_rest_kept(tmp_path):
    mpy(tmp_path, """
s = Spool(BASE, ram_count=100)
for i in range(10):
    s.put(rec(i))
s.flush()
report()
""")
    dat = tmp_path / "spool" / "spool.dat"
    assert dat.stat().st_size == 10 * 107
    with open(dat, "r+b") as f:  # a power cut in the middle of the tenth record
        f.truncate(9 * 107 + 50)
    got = mpy(tmp_path, """
s = Spool(BASE)
n, torn = len(s), s.torn
s.put(rec(100))
s.flush()
report(n=n, torn=torn, order=drain(s))
""")
    assert got == {"n": 9, "torn": 1, "order": names(*range(9), 100)}


def test_a_corrupt_record_and_everything_after_it_is_dropped(tmp_path):
    mpy(tmp_path, "s = Spool(BASE, ram_count=100)\n"
                  "for i in range(10):\n    s.put(rec(i))\ns.flush()\nreport()\n")
    dat = tmp_path / "spool" / "spool.dat"
    raw = bytearray(dat.read_bytes())
    raw[7 * 107 + 20] ^= 0x40  # one flipped bit in the eighth record's data
    dat.write_bytes(bytes(raw))
    got = mpy(tmp_path, "s = Spool(BASE)\nreport(torn=s.torn, order=drain(s))\n")
    assert got == {"torn": 1, "order": names(*range(7))}
    # a head file that was damaged: everything is sent again, nothing is lost
    mpy(tmp_path, "s = Spool(BASE, ram_count=100)\n"
                  "for i in range(5):\n    s.put(rec(i))\ns.flush()\ns.pop()\ns.flush()\n"
                  "report()\n")
    (tmp_path / "spool" / "spool.hd").write_bytes(b"\xff\x00garbage")
    got = mpy(tmp_path, "s = Spool(BASE)\nreport(order=drain(s))\n")
    assert got["order"] == names(*range(5))


def test_flash_is_written_once_per_batch(tmp_path):
    got = mpy(tmp_path, """
s = Spool(BASE, ram_count=16, ram_bytes=8192, head_every=16)
for i in range(320):
    s.put(rec(i))
s.flush()
puts = len(opened)
ok = True
for i in range(320):  # checked as it goes: 320 live strings would fragment the heap
    ok = ok and s.pop()[:6] == b'r%05d' % i
report(puts=puts, total=len(opened), writes=s.writes, ok=ok and len(s) == 0)
""")
    # 320 records in batches of 17 (the ring spills when it passes 16): 19 appends + 1 flush
    assert got["puts"] <= 20
    # draining: one head file every 16 records (tmp + rename = one write-mode open)
    assert got["total"] - got["puts"] <= 320 // 16
    assert got["total"] - got["puts"] >= 320 // 16 - 1  # ... and it was counted
    assert got["writes"] <= 40  # appends, head saves and the final delete, all counted
    assert got["ok"]


def test_oversized_records_are_refused(tmp_path):
    got = mpy(tmp_path, """
s = Spool(BASE, max_record=4096)
try:
    s.put(b'x' * 4097)
except ValueError as e:
    report(error=str(e), n=len(s))
""")
    assert got == {"error": "record of 4097 bytes is over max_record (4096)", "n": 0}
    assert os.listdir(tmp_path / "spool") == []


def test_flash_errors_are_counted_and_never_stop_the_queue(tmp_path):
    got = mpy(tmp_path, """
import os
s = Spool(BASE, ram_count=4, head_every=2)
for i in range(10):
    s.put(rec(i))
s.flush()
def broken(*a):
    raise OSError(28)  # ENOSPC
_sp.write_atomic = broken
first = [s.pop().decode()[:6] for _ in range(5)]   # head saves fail: popping goes on
head_errors = s.flash_errors
_sp.open = broken                                   # now appends fail too
for i in range(10, 20):
    s.put(rec(i))
ram = s.ram_len()
_sp.open = counting_open
os.remove(BASE + '/spool.dat')                      # and the file vanishes under it
rest = drain(s)
report(first=first, head_errors=head_errors, ram=ram, errors=s.flash_errors, rest=rest,
       dropped=s.dropped, torn=s.torn)
""")
    assert got["first"] == names(*range(5))
    assert got["head_errors"] >= 2
    assert got["ram"] == 4  # RAM stays bounded when flash refuses the spill ...
    # ... by dropping its oldest routine records, counted with the 5 lost with the file
    assert got["rest"] == names(16, 17, 18, 19)
    assert got["dropped"] == 6 + 5
    assert got["torn"] == 1 and got["errors"] > got["head_errors"]


def test_a_full_64k_spool_stays_small_on_the_heap(tmp_path):
    got = mpy(tmp_path, """
import gc
_sp.open = node.fsutil.open = _open  # no counting here: its list would grow
gc.collect()
before = gc.mem_alloc()
s = Spool(BASE, ram_count=16, flash_bytes=65536)
worst = 0
for i in range(1200):
    s.put(rec(i, 120))
    if i % 50 == 0:
        gc.collect()
        worst = max(worst, gc.mem_alloc() - before)
n = len(s)
ok = True
prev = None
while len(s):
    k = int(s.pop()[1:6])
    ok = ok and (prev is None or k == prev + 1)  # what is kept is one unbroken run
    prev = k
report(n=n, dropped=s.dropped, worst=worst, last=prev, ok=ok, writes=s.writes)
""")
    assert got["n"] + got["dropped"] == 1200
    assert got["n"] * 127 <= 65536 + 16 * 127 and got["dropped"] > 600
    assert got["last"] == 1199 and got["ok"]  # the newest kept, oldest dropped, in a row
    assert got["worst"] < 8 * 1024  # RAM ring + buffers; the file is never listed on the heap
    print(f"\nfull 64 KB spool: {got['n']} kept, {got['dropped']} dropped, heap <= "
          f"{got['worst']} B, {got['writes']} flash writes for 1200 puts")

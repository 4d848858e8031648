"""node.heap on the MicroPython unix port: a task that counts its steps with a Collector
has its garbage collected in turns of its own, so the allocator (which collects in
whatever step finds no room) almost never has to; the pace follows a task that starts
making more garbage a step."""

from __future__ import annotations

import pytest

from citynode.testing.micropython import run_micropython_json

SCRIPT = """
import gc, json
from node.heap import Collector

keep = [bytearray(1000) for _ in range(20)]     # live data, as the node's buffers
heap = Collector() if {paced} else None
in_steps = 0                                    # collections the allocator made in a step

def step(size):
    # a step's garbage (a signer's big ints), in one tuple: a list grown by appends
    # frees its old blocks, which would read as a collection
    junk = (bytearray(size), bytearray(size), bytearray(size), bytearray(size))
    return len(junk)

for n in range(600):
    if heap is not None and heap.due():
        heap.tend()                             # a look or a collection, in a turn of its own
    size = 300 if n < 300 else 900              # then 2.5 times the garbage a step
    before = gc.mem_free()
    step(size)
    if gc.mem_free() > before:                  # the step freed memory: it collected
        in_steps += 1
    if heap is not None:
        heap.step()
print(json.dumps({{"in_steps": in_steps, "paced": heap.collections if heap else 0}}))
"""


@pytest.mark.parametrize("paced", [False, True])
def test_a_paced_task_leaves_the_allocator_nothing_to_collect(paced):
    out = run_micropython_json(SCRIPT.format(paced=paced), heap_kb=64)
    if not paced:   # the control: this much garbage fills the heap many times
        assert out["in_steps"] >= 20, out
        return
    # the first interval (pace unknown, FIRST_STEPS) and the change of pace may each let
    # the allocator collect once before the collector has learnt the new pace
    assert out["in_steps"] <= 3, out
    assert out["paced"] >= 20, out


REST = """
import asyncio, gc, json
from node.doorbell import Doorbell
from node.heap import Collector

keep = [bytearray(1000) for _ in range(20)]     # live data, as the node's buffers
heap = Collector()
bell = Doorbell()
out = {{"in_others": 0, "woke_ms": None}}

async def others():                             # the other tasks' garbage, by the clock
    while True:
        before = gc.mem_free()
        junk = bytearray(2000)
        if gc.mem_free() > before:              # this allocation collected
            out["in_others"] += 1
        await asyncio.sleep_ms(10)

async def main():
    asyncio.create_task(others())
    resting = asyncio.create_task(heap.rest(bell) if {paced} else bell.wait(3000))
    await asyncio.sleep_ms(3000)
    rang = time.ticks_ms()
    bell.ring()
    await resting
    out["woke_ms"] = time.ticks_diff(time.ticks_ms(), rang)
    out["paced"] = heap.collections

import time
asyncio.run(main())
print(json.dumps(out))
"""


@pytest.mark.parametrize("paced", [False, True])
def test_a_resting_task_collects_the_others_garbage_before_the_allocator_must(paced):
    """The signer idle (its pool full) steps nothing, and the other tasks' garbage filled
    the heap until an allocation in their turns collected it (the audio's turns at chip
    speed). Collector.rest() waits on the signer's doorbell and looks at the heap by the
    clock meanwhile, collecting in its own turns; a ring ends the rest at once."""
    out = run_micropython_json(REST.format(paced=paced), heap_kb=128)
    if not paced:   # the control: 200 KB/s of garbage fills this heap many times in 3 s
        assert out["in_others"] >= 5, out
        return
    assert out["in_others"] <= 1, out
    assert out["paced"] >= 5, out
    assert out["woke_ms"] < 50, out


LIVE = """
import gc, json
from node.heap import Collector

keep = []
while gc.mem_free() > LEFT:                     # a heap that is mostly live data
    keep.append(bytearray(1000))
gc.collect()
heap = Collector()
free_after = gc.mem_free()
for n in range(200):
    if heap.due():
        heap.tend()
    junk = (bytearray(300), bytearray(300))     # a step's garbage: 600 B
    heap.step()
print(json.dumps({{"free_after": free_after, "paced": heap.collections}}))
"""


def test_a_heap_mostly_live_is_not_collected_at_every_step():
    """With less free after a collection than the reserve (a node whose live data grew),
    a collection planned 'while the reserve is still free' would be due at once, every
    step: the collector waits for GAIN bytes of garbage instead."""
    out = run_micropython_json(LIVE.replace("LEFT", "11000").format(), heap_kb=64)
    assert out["free_after"] < 16384, out     # under node.heap.RESERVE
    # 200 steps x 600 B of garbage: ~15 collections of 8 KB (GAIN), not 200
    assert 5 <= out["paced"] <= 30, out

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
        heap.collect()                          # in a turn of its own
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

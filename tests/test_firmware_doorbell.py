"""node.doorbell on the MicroPython unix port: a rung waiter runs after one turn of the
loop's other tasks (asyncio.wait_for_ms on an Event takes three), an unrung one after
its time, and a task cancelled while it waits is still cancelled."""

from __future__ import annotations

from citynode.provisioning.device import last_json
from citynode.testing.micropython import run_micropython

SCRIPT = """
import asyncio, json, time
from node.doorbell import Doorbell

turns = [0]
async def busy():                       # another task: a turn of the loop, again and again
    while True:
        turns[0] += 1
        await asyncio.sleep_ms(0)

async def by_bell(bell, woke):
    while True:
        await bell.wait(5000)
        woke.append(turns[0])

async def by_event(event, woke):        # what the app did before
    while True:
        event.clear()
        try:
            await asyncio.wait_for_ms(event.wait(), 5000)
        except asyncio.TimeoutError:
            pass
        woke.append(turns[0])

async def turns_to_wake(waiter, wake, thing):
    woke = []
    tasks = [asyncio.create_task(busy()) for _ in range(4)]
    tasks.append(asyncio.create_task(waiter(thing, woke)))
    await asyncio.sleep_ms(20)
    rung = turns[0]
    wake()
    while not woke:
        await asyncio.sleep_ms(0)
    for t in tasks:
        t.cancel()
    await asyncio.sleep_ms(0)
    return woke[0] - rung

async def main():
    out = {}
    bell = Doorbell()
    out["bell_turns"] = await turns_to_wake(by_bell, bell.ring, bell)
    event = asyncio.Event()
    out["event_turns"] = await turns_to_wake(by_event, event.set, event)

    bell = Doorbell()                   # not rung: it waits its time
    t = time.ticks_ms()
    out["timed_out_rang"] = await bell.wait(150)
    out["timed_out_ms"] = time.ticks_diff(time.ticks_ms(), t)
    bell.ring()                         # rung before the wait: at once, and used up
    t = time.ticks_ms()
    out["rung_before_rang"] = await bell.wait(150)
    out["rung_before_ms"] = time.ticks_diff(time.ticks_ms(), t)
    t = time.ticks_ms()
    await bell.wait(100)
    out["after_ms"] = time.ticks_diff(time.ticks_ms(), t)

    async def waiting():
        try:
            await bell.wait(5000)
            return "woke"
        except asyncio.CancelledError:
            return "cancelled"
    task = asyncio.create_task(waiting())
    await asyncio.sleep_ms(10)
    task.cancel()
    out["cancelled"] = await task
    out["bell_free"] = bell._sleeper is None
    print(json.dumps(out))

asyncio.run(main())
"""


def test_a_ring_wakes_the_waiter_after_one_turn_of_the_others():
    result = last_json(run_micropython(SCRIPT))
    # four busy tasks: one turn each before the waiter (wait_for_ms: three rounds)
    assert result["bell_turns"] <= 5, result
    assert result["event_turns"] >= 8, result
    assert 150 <= result["timed_out_ms"] < 300 and result["timed_out_rang"] is False, result
    assert result["rung_before_rang"] is True, result
    assert result["rung_before_ms"] < 20 and 100 <= result["after_ms"] < 200, result
    assert result["cancelled"] == "cancelled" and result["bell_free"], result

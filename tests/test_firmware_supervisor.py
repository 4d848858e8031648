"""The watchdog feeder on the MicroPython unix port: fed while every task makes
progress, including a task quiet by design; not fed once one stops."""

from __future__ import annotations

from citynode.provisioning.device import last_json
from citynode.testing.micropython import run_micropython

# The supervisor's logic against a feed counter (the unix port has no machine.WDT;
# the emulated board's WDT is tested in hil_tests/test_resilience.py).
SCRIPT = """
import asyncio, json
from node.supervisor import Supervisor

class Counter:
    feeds = 0
    def feed(self):
        self.feeds += 1

async def ticker(sup, name, every_ms, stop_after_ms=None, quiet_ms=0):
    sup.register(name)
    spent = 0
    while stop_after_ms is None or spent < stop_after_ms:
        sup.beat(name, quiet_ms)
        await asyncio.sleep_ms(every_ms)
        spent += every_ms
    await asyncio.sleep_ms(100000)           # stuck: never beats again

async def run(case):
    dog = Counter()
    sup = Supervisor(timeout_ms=400, wdt=dog)       # checks every 100 ms
    tasks = [asyncio.create_task(sup.run()), asyncio.create_task(ticker(sup, "fast", 20))]
    if case == "quiet":          # beats every 700 ms but says so: alive
        tasks.append(asyncio.create_task(ticker(sup, "sensor", 700, quiet_ms=800)))
    elif case == "slow":         # beats every 700 ms without saying so: stalled
        tasks.append(asyncio.create_task(ticker(sup, "sensor", 700)))
    elif case == "stuck":        # quiet by design, then stuck for good
        tasks.append(asyncio.create_task(ticker(sup, "sensor", 300, 300, quiet_ms=350)))
    await asyncio.sleep_ms(1500)
    first = dog.feeds
    await asyncio.sleep_ms(1500)
    return {"fed_late": dog.feeds - first, "stalled": sup.stalled}

out = {}
for case in ("quiet", "slow", "stuck"):
    out[case] = asyncio.run(run(case))
print(json.dumps(out))
"""


def test_feeds_only_while_every_task_beats_or_is_quiet_by_design():
    result = last_json(run_micropython(SCRIPT))
    assert result["quiet"]["fed_late"] >= 10, result            # ~15 checks in 1.5 s
    assert result["slow"]["stalled"] == "sensor", result
    assert result["slow"]["fed_late"] <= 4, result               # only right after its beats
    assert result["stuck"] == {"fed_late": 0, "stalled": "sensor"}, result

"""The hardware watchdog, fed only while every task of the node makes progress.

Each long-running task calls beat(name) when it completes a cycle. The feeder
feeds the WDT only if every registered task has beaten since the last feed, so a
task stuck in a driver, a dead loop or a blocked socket stops the feeding and the
chip resets, instead of a node that looks alive but sends nothing.
"""

import asyncio
import time


class Supervisor:
    def __init__(self, timeout_ms=30000, wdt=None):
        if wdt is None:
            from machine import WDT
            wdt = WDT(timeout=timeout_ms)
        self._wdt = wdt
        self._period_ms = timeout_ms // 4
        self._beats = {}
        self.stalled = None       # the task that stopped the feeding, for the crash report
        self.loop_ms_max = 0      # the longest gap between two feeder turns (loop health)

    def register(self, name):
        self._beats[name] = True

    def beat(self, name):
        self._beats[name] = True

    def all_alive(self):
        for name in self._beats:
            if not self._beats[name]:
                self.stalled = name
                return False
        return True

    async def run(self):
        last = time.ticks_ms()
        while True:
            await asyncio.sleep_ms(self._period_ms)
            now = time.ticks_ms()
            gap = time.ticks_diff(now, last) - self._period_ms
            if gap > self.loop_ms_max:
                self.loop_ms_max = gap
            last = now
            if self.all_alive():
                self._wdt.feed()
                for name in self._beats:
                    self._beats[name] = False

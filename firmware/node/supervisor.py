"""The hardware watchdog, fed only while every task of the node makes progress.

Each long-running task calls beat(name) when it completes a cycle. The feeder
feeds the WDT only if every registered task has beaten since the last feed, so a
task stuck in a driver, a dead loop or a blocked socket stops the feeding and the
chip resets, instead of a node that looks alive but sends nothing. A task that is
quiet by design (a sensor read every 30 s) says so when it beats: beat(name, quiet_ms)
counts it alive until then, and stuck only once that time is over.
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
        self._quiet_until = {}
        self.stalled = None       # the task that stopped the feeding, for the crash report
        self.loop_ms_max = 0      # the longest gap between two feeder turns (loop health)

    def register(self, name):
        self._beats[name] = True

    def beat(self, name, quiet_ms=0):
        self._beats[name] = True
        if quiet_ms:
            self._quiet_until[name] = time.ticks_add(time.ticks_ms(), quiet_ms)

    def _quiet(self, name, now):
        until = self._quiet_until.get(name)
        return until is not None and time.ticks_diff(until, now) > 0

    def all_alive(self):
        now = time.ticks_ms()
        for name in self._beats:
            if not self._beats[name] and not self._quiet(name, now):
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
            else:  # the console tells a technician which task the dog will bite for
                print("citynode: watchdog not fed: task %s stalled" % self.stalled)

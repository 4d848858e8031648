"""What an idle task waits on: ring() wakes it at once, else it wakes on its own after a
while (to beat for the watchdog and look around).

asyncio.wait_for_ms(event.wait(), ms) does the same, but makes two tasks per wait and
the waiter runs only three turns of the loop after set(): on the chip each turn of a
busy loop is tens of ms, and an impulse event crossed seven of them on its way out
(issue 11). Here a ring is one turn, and a wait allocates nothing but the
cancellation that ends it early.
"""

import asyncio


class Doorbell:
    def __init__(self):
        self.rung = False
        self._sleeper = None            # the task asleep in wait(), if any

    def ring(self):
        """Wake the waiter now, or make its next wait() return at once."""
        self.rung = True
        task = self._sleeper
        if task is not None:
            self._sleeper = None
            task.cancel()               # ends its sleep: queued to run at once

    def clear(self):
        """Forget a ring that came before now: its waiter has already seen to it."""
        self.rung = False

    async def wait(self, ms):
        """Until ring() or for ms: whether it rang (the ring is used up)."""
        if not self.rung:
            self._sleeper = asyncio.current_task()
            try:
                await asyncio.sleep_ms(ms)
            except asyncio.CancelledError:
                if not self.rung:       # not ours: the task itself is cancelled
                    raise
            finally:
                self._sleeper = None
        rung = self.rung
        self.rung = False
        return rung

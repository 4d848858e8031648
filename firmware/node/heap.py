"""The heap collected in a turn of its own, before it is full (issue 11).

MicroPython collects when an allocation finds no room, in whichever turn of the loop
allocates: on the chip a collection is some ms, and most of the node's garbage is the
signer's (P-256 arithmetic in big integers: ~86 % of the collections at chip speed fell
in its turns, which then held the loop over 20 ms). So the signer's task counts its
steps here and, when `due()`, `tend()`s the heap (a look or a collection) in a turn with
nothing else in it; while it has nothing to do it waits in `rest()`, which sees to the
other tasks' garbage by the clock.

Pacing: the room free at a look after a collection, and again a third of the way to
the next, gives the heap a step uses (everyone's use in that time, the other tasks'
garbage too); the next collection is planned for while `reserve` bytes are still free.
The second look plans again from what is really free, so a task that starts making
garbage faster is caught up with before the heap is full. At rest the same is done by
the clock: the heap a ms takes, learnt between looks, says when to look again. A look
is gc.mem_free(), which walks the allocation table (3-5 ms at chip speed, as much as
half a collection), so a look, like a collection, has a turn of its own.
"""

import gc
import time

RESERVE = 16384         # bytes left free for every other task's allocations meanwhile
GAIN = 8192             # the least a collection is planned to free: where what is live
                        # leaves under RESERVE + GAIN free, wait for this much garbage
FIRST_STEPS = 8         # steps before the first collection, while the pace is unknown
LOOK_MS = 250           # at rest: the first wait; a collection when the reserve is nearer
LAST_LOOK_MS = 10000    # at rest: the longest wait between looks
_NOT_YET = 1 << 30      # not planned (a look, a collection) until the next look


class Collector:
    """Counts steps of one allocating task; `due()` when it should look at the heap or
    collect it (`tend()`)."""

    def __init__(self, reserve=RESERVE):
        self.reserve = reserve
        self.per_step = 0               # heap bytes a step, as last learnt; 0: not yet
        self.per_ms = 0                 # heap bytes a ms at rest, as last learnt; 0: not yet
        self.collections = 0
        self.steps = 0                  # since the last collection
        self._after = None              # free at the first look after the last collection
        self._fresh = False             # the next look is that one
        self._look_again()

    def _look_again(self):
        """Look in the next turn, and plan from there (after a collection, or a rest)."""
        self._free = None               # free at the last look; None: not looked since
        self._base = self.steps         # the steps counted then
        self._look_at = self.steps
        self._due_at = _NOT_YET

    def step(self):
        self.steps += 1

    def due(self):
        """Whether a look or a collection is due: `tend()` it, in a turn of its own."""
        return self.steps >= self._look_at or self.steps >= self._due_at

    def tend(self):
        """The look or the collection that is due."""
        if self.steps >= self._look_at:
            self._plan()
        else:
            self.collect()

    def _plan(self):
        free = self._look()
        steps = self.steps - self._base
        learnt = self._free is not None and self._free > free and steps > 0
        if learnt:                      # else a collection came first: the pace stands
            self.per_step = (self._free - free) // steps or 1
        left = self._steps_left(free)
        self._due_at = self.steps + left
        self._look_at = _NOT_YET
        if not learnt:                  # look again a third of the way
            self._free, self._base = free, self.steps
            self._look_at = self.steps + max(1, left // 3)

    def collect(self):
        gc.collect()
        self.collections += 1
        self.steps = 0
        self._fresh = True
        self._look_again()

    def _look(self):
        """gc.mem_free(), the first after a collection kept."""
        free = gc.mem_free()
        if self._fresh:
            self._after, self._fresh = free, False
        return free

    def _room(self, free):
        """What may be used before the next collection: down to the reserve, and at
        least GAIN below what the last one left (no collection at every step of a heap
        that is mostly live)."""
        target = self.reserve
        if self._after is not None:
            target = min(target, self._after - GAIN)
        return max(0, free - target)

    async def rest(self, bell):
        """Wait for `bell` (a node.doorbell.Doorbell), the heap collected meanwhile in
        turns of this task's own when the others' garbage has used it up. A turn takes a
        look or a collection, not both."""
        wait, free, since, collect = 0, None, 0, False
        while not await bell.wait(wait):
            wait = 0
            if collect:
                self.collect()
                collect, free = False, None
                continue
            now = time.ticks_ms()
            if free is None:            # after a collection, or first
                free = self._look()
            else:
                free = self._learn(free, since, now)
                collect = self._ms_left(free) < LOOK_MS
            since = now
            if not collect:
                wait = self._rest_ms(free)
        self._look_again()              # back to steps: the plan from the next turn's look

    def _learn(self, before, since, now):
        """What is free now; the heap a ms used since `since`. If the allocator collected
        meanwhile (more is free), the heap was used up: `before` in that time, at least,
        and twice what was thought."""
        free = self._look()
        ms = time.ticks_diff(now, since)
        if ms > 0:
            if before >= free:          # at most halved at a look: a collection unseen
                self.per_ms = max((before - free) // ms, self.per_ms // 2, 1)
            else:                       # and the wait was too long: halve the next
                self.per_ms = max(2 * self.per_ms, before // ms or 1)
        return free

    def _ms_left(self, free):
        """At rest, how long until only the reserve is free (LAST_LOOK_MS: not known)."""
        if not self.per_ms:
            return LAST_LOOK_MS
        return self._room(free) // self.per_ms

    def _rest_ms(self, free):
        """How long a rest may wait before it looks again: half the time left."""
        if not self.per_ms:
            return LOOK_MS
        return min(LAST_LOOK_MS, self._ms_left(free) // 2)

    def _steps_left(self, free):
        if not self.per_step:
            return FIRST_STEPS
        return self._room(free) // self.per_step

"""The heap collected in a turn of its own, before it is full (issue 11).

MicroPython collects when an allocation finds no room, in whichever turn of the loop
allocates: on the chip a collection is some ms, and most of the node's garbage is the
signer's (P-256 arithmetic in big integers: ~86 % of the collections at chip speed fell
in its turns, which then held the loop over 20 ms). So the signer's task counts its
steps here and, when `due()`, collects in a turn with nothing else in it.

Pacing: the room free after a collection, and again a third of the way to the next,
gives the heap a step uses (everyone's use in that time, the other tasks' garbage too);
the next collection is planned for while `reserve` bytes are still free. The look
midway plans again from what is really free, so a task that starts making garbage
faster is caught up with before the heap is full. gc.mem_free() walks the allocation
table, some ms of chip time: two an interval.
"""

import gc

RESERVE = 8192          # bytes left free for every other task's allocations meanwhile
FIRST_STEPS = 8         # steps before the first collection, while the pace is unknown


class Collector:
    """Counts steps of one allocating task; `due()` when it should collect (`collect()`)."""

    def __init__(self, reserve=RESERVE):
        self.reserve = reserve
        self.per_step = 0               # heap bytes a step, as last learnt; 0: not yet
        self.collections = 0
        self.steps = 0                  # since the last collection
        self._free = 0                  # free just after it
        self._look_at = 0               # the step at which to look again (0: none)
        self._due_at = FIRST_STEPS

    def step(self):
        self.steps += 1
        if self.steps == self._look_at:
            free = gc.mem_free()
            if self._free > free:       # else a collection came first: the pace stands
                self.per_step = (self._free - free) // self.steps or 1
            self._due_at = self.steps + self._steps_left(free)

    def due(self):
        return self.steps >= self._due_at

    def collect(self):
        gc.collect()
        self.collections += 1
        self.steps = 0
        self._free = gc.mem_free()
        self._due_at = max(1, self._steps_left(self._free))
        self._look_at = max(1, self._due_at // 3)

    def _steps_left(self, free):
        if not self.per_step:
            return FIRST_STEPS
        return max(0, (free - self.reserve) // self.per_step)

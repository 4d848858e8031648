"""The app's P-256 work, in steps that leave the event loop free (issue 11).

A whole ES256 signature takes the chip ~0.5-1 s and a verification ~2 s in pure
Python, while the I2S ring holds only ~42 ms of audio. So every P-256 operation of the
running node is a generator of steps (node.ec: one point operation, or 16 bits of an
inversion, per step: ~5 ms of the chip's time), and one task, Signer.run(), steps them
with the loop free in between: jobs first (urgent ones before the others), then the
nonce pool. A turn of the task takes steps for up to `slice_us` (SLICE_US: under the
20 ms stall target and half the ring), and begins none its last step says would end
past it: one step per turn made a pair (164 steps) take
~35 s at chip speed, where a turn of the loop is ~200 ms, and a burst of events emptied
the pool.

The nonce pool holds up to `size` pairs (r, k**-1 mod n), made ahead in idle time, so a
signature with one is s = k**-1 (e + r d) mod n: two multiplications, no step at all.
An urgent envelope (an impulse event) may take the last pair; a routine one (a window,
a status record) leaves `reserve` pairs for the urgent ones and is otherwise signed
whole, in steps, with a hedged nonce. Why the pairs are safe (docs/decisions.md):
- k is RFC 6979's HMAC-SHA256 generator keyed by the private key, with os.urandom,
  the boot number and a counter as section 3.6's additional data: a bad RNG alone
  leaves k a secret function of (key, boot, counter), which never repeats; a stuck key
  read or a fault alone still gets fresh randomness. A fault in k*G (off the curve)
  is refused.
- A pair is taken out of the pool before it is used, so it signs once; the pool lives
  in RAM only (gone at reset) and is emptied when the node switches keys.
"""

import asyncio
import os
import time
from hashlib import sha256

from node import p256
from node.doorbell import Doorbell
from node.heap import Collector

_MORE = object()                        # _step: the generator has not ended
SLICE_US = 8000                         # a turn of the signer: steps for up to this long
# what a step of the signer's work left: more to do, a job done (its caller goes next),
# nothing to do, a fault (wait)
_BUSY, _DONE, _IDLE, _PAUSE = 0, 1, 2, 3


def _step(steps):
    """One step of a generator: _MORE, or its value once it has ended."""
    try:
        next(steps)
        return _MORE
    except StopIteration as end:
        return end.value


async def run_steps(steps):
    """A generator of steps run in the calling task, the loop free between steps; its value."""
    while True:
        value = _step(steps)
        if value is not _MORE:
            return value
        await asyncio.sleep_ms(0)


class _Job:
    def __init__(self, steps):
        self.steps = steps
        self.done = asyncio.Event()
        self.value = None
        self.error = None


class Signer:
    """ES256 for the app with `keys` (keys.NodeKeys); `boot` (seqno) keeps nonces apart
    across boots. run() must be running (a task) for anything but a pool signature. Counters: pairs (signatures from the pool), whole (signed in steps),
    made (pairs made this boot)."""

    def __init__(self, keys, boot, size=4, reserve=2, slice_us=SLICE_US):
        self.keys = keys
        self.slice_us = slice_us        # 0: one step per turn
        keys.check()                    # NoKey before provisioning; raises if damaged
        self.boot = boot
        self.size = size
        self.reserve = reserve
        self.pool = []                  # (r, k_inv), each used once; RAM only
        self.pairs = 0
        self.whole = 0
        self.made = 0
        self._count = 0                 # nonces derived this boot
        self._urgent = []
        self._jobs = []
        self._fill = None
        self._build = None              # the comb's table, in steps, until it is built
        self._first = size > 0          # the first pair goes before routine jobs
        self._wake = Doorbell()
        self.heap = Collector()         # its garbage collected in turns of their own

    def _extra(self):
        """RFC 6979 section 3.6 additional data: fresh randomness, boot number, counter."""
        self._count += 1
        return os.urandom(32) + self.boot.to_bytes(8, "big") + self._count.to_bytes(8, "big")

    # --- what the app calls ---------------------------------------------------------
    def at_once(self, urgent=False):
        """Whether sign() would sign at once, with a pool pair, rather than in steps."""
        return len(self.pool) > (0 if urgent else self.reserve)

    async def sign(self, msg, urgent=False):
        """ES256 signature r || s of `msg`: at once with a pool pair when one may be taken
        (urgent: any; routine: above the reserve), else whole in steps."""
        return await self.sign_digest(sha256(msg).digest(), urgent)

    async def sign_digest(self, digest, urgent=False):
        """sign() of a message by its SHA-256 (cose.sign1_digest: no copy of the payload)."""
        pool = self.pool
        while pool and (urgent or len(pool) > self.reserve):
            r, k_inv = pool.pop(0)      # out of the pool before use: it never signs twice
            self._wake.ring()
            sig = p256.sign_with_pair(self.keys._private(), digest, r, k_inv)
            if sig:
                self.pairs += 1
                return sig
        self.whole += 1
        return await self.complete(p256.sign_steps(self.keys._private(), digest, self._extra()),
                                   urgent)

    def mac(self, msg):
        """HMAC-SHA256 with the node's secret (the COSE_Mac0 option): cheap, no steps."""
        return self.keys.mac(msg)

    async def complete(self, steps, urgent=False):
        """The value of a generator of steps run by the worker, urgent jobs first (an
        exception it raises is raised here)."""
        job = _Job(steps)
        (self._urgent if urgent else self._jobs).append(job)
        self._wake.ring()
        await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.value

    async def next_key(self):
        """keys.next_key() in steps: the next key's public key (the node still signs with
        the current one)."""
        return await self.complete(self.keys.next_key_steps())

    async def commit_next(self):
        """Sign with the next key from now on; its public key. The pool goes with the old
        key (its nonces were derived from it)."""
        self.keys.commit_next()
        self.forget()
        return await self.complete(self.keys.public_key_steps())

    def forget(self):
        """Drop every pair and the one being made."""
        self.pool.clear()
        self._fill = None
        self._first = False
        self._wake.ring()

    # --- the worker -----------------------------------------------------------------
    async def run(self):
        """The task: the comb's table first, then steps of the oldest urgent job, else of
        the first pair (so an impulse soon after boot needs no whole signature), else of
        the oldest job, else of the next pair, for up to slice_us a turn; at rest when
        the pool is full. The heap is collected in turns of its own (node.heap), at rest
        too."""
        self._build = p256.precompute_steps()
        heap = self.heap
        while True:
            if heap.due():
                heap.tend()                 # a look or a collection, alone in its turn
                await asyncio.sleep_ms(0)
            start = time.ticks_us()
            state = self._work()
            step = time.ticks_diff(time.ticks_us(), start)
            # another step only if it would end within the slice, judged by the last one
            # (a turn that began one at 11 of 12 ms went on to ~17, and past 20 after a GC)
            while (state == _BUSY and not heap.due()
                   and time.ticks_diff(time.ticks_us(), start) + step <= self.slice_us):
                began = time.ticks_us()
                state = self._work()
                step = time.ticks_diff(time.ticks_us(), began)
            if state == _IDLE:
                self._wake.clear()          # what rang it is done
                await heap.rest(self._wake)
            elif state == _PAUSE:
                await asyncio.sleep_ms(1000)    # a fault: again later, not in a hot loop
            else:
                await asyncio.sleep_ms(0)

    def _work(self):
        """One step of the most pressing work; what it left (_BUSY, _DONE, ...)."""
        self.heap.step()
        if self._build is not None:
            try:
                if _step(self._build) is not _MORE:
                    self._build = None
            except Exception as exc:        # a MemoryError at boot: again, later
                print("signer: table:", exc)
                self._build = p256.precompute_steps()
                return _PAUSE
        elif self._urgent or (self._jobs and not self._first):
            return self._job_step(self._urgent or self._jobs)
        elif len(self.pool) < self.size:
            if not self._fill_step():
                return _PAUSE                   # a fault or no key
        else:
            return _IDLE
        return _BUSY

    def _job_step(self, jobs):
        job = jobs[0]
        try:
            value = _step(job.steps)
            if value is _MORE:
                return _BUSY
            job.value = value
        except Exception as exc:        # the caller's to handle (a refused command)
            job.error = exc
        jobs.pop(0)
        job.done.set()
        return _DONE

    def _fill_step(self):
        """A step of the next pair; False if making it failed."""
        try:
            if self._fill is None:
                self._fill = p256.pair_steps(self.keys._private(), self._extra())
            pair = _step(self._fill)
        except Exception as exc:
            print("signer: nonce pair:", exc)
            self._fill = None
            self._first = False
            return False
        if pair is not _MORE:
            self._fill = None
            self.pool.append(pair)
            self.made += 1
            self._first = False
        return True

"""The node's wall clock: SNTP from the pole (its chrony), the crystal's drift tracked.

Time is kept on the uptime line: uptime_ms() is ticks_ms() carried past its wrap (2**30
ms on the ESP32, 12.4 days), so it never repeats, and wall time is uptime plus an
offset. A sync sends a few SNTP requests and keeps the answer with the shortest round
trip (the least room for an unknown delay); between syncs the offset moves at the
drift measured from the last two. Before the first sync unix_ms() is None, and any
uptime can be turned into wall time once it is known (wall_ms_at), so nothing taken
before the sync has to stay without a time.

A request first waits HOLD_MS on its socket, blocking the loop: a wait on the event
loop would read the answer's arrival a loop turn late (tens of ms at chip speed), which
is the error itself, and on the pole's Wi-Fi most answers come within it. That turn has
nothing else in it: the request is made ready in the turn before and the answer worked
out in the turn after (at chip speed the hold's turns were over 20 ms two times in
three). A later answer is waited for on the loop (no stall over HOLD_MS), up to WAIT_MS:
read late, its round trip looks longer by as much, so the best-of-SAMPLES choice ranks
it below any answer read at once. If even the best took over MAX_RTT_MS (the loop or
the host held for all six), a synced clock keeps its time and tries again in RETRY_S; a
first sync is applied all the same, and tried again as soon. The answer must echo the
request's random transmit time, so a stray or forged datagram is dropped.
"""

import os
import socket
import struct
import time

NTP_PORT = 123
NTP_TO_UNIX_S = 2208988800      # 1900-01-01 to 1970-01-01
HOLD_MS = 15                    # per request, blocking: most of the pole's Wi-Fi round trips
WAIT_MS = 250                   # per request, in all: then it counts as lost
POLL_MS = 5                     # between looks at the socket after HOLD_MS
SAMPLES = 6                     # requests per sync, the best one kept
MAX_RTT_MS = 100                # a best answer slower than this may be off by half of it
GAP_MS = 150                    # between requests: the loop runs meanwhile
SYNC_S = 300                    # between syncs once synced
RETRY_S = 10                    # after a sync that got no answer
MAX_DRIFT_PPM = 500             # beyond this a measured drift is a bad sample
_PERIOD = time.ticks_add(0, -1) + 1   # the wrap of ticks_ms() and ticks_us(): 2**30 on ESP32


class Clock:
    """uptime_ms(), unix_ms() once synced, and the sync with the pole's time server."""

    def __init__(self):
        self._high = 0                  # ms carried from the wraps of ticks_ms()
        self._last = time.ticks_ms()
        self._base_up_us = None         # uptime (us) of the last sync
        self._base_unix_us = None       # wall time (Unix us) at that uptime
        self._drift_ppm = 0
        self.syncs = 0
        self.last_rtt_us = None         # round trip of the sample the last sync kept
        self.last_step_us = 0           # how far that sync moved the clock
        self._packet = bytearray(48)

    # --- the uptime line ------------------------------------------------------------
    def uptime_ms(self):
        """Milliseconds since boot, never wrapping (call it at least every 6 days)."""
        now = time.ticks_ms()
        if now < self._last:
            self._high += _PERIOD
        self._last = now
        return self._high + now

    def uptime_us(self, ticks_us=None):
        """Microseconds since boot at `ticks_us` (a ticks_us() read within minutes; now
        by default). Both tick counters count one timer (ticks_ms is ticks_us / 1000
        before their wraps), so uptime_ms() says which turn of ticks_us this is."""
        if ticks_us is None:
            ticks_us = time.ticks_us()
        turn = (self.uptime_ms() * 1000 - ticks_us + _PERIOD // 2) // _PERIOD
        return turn * _PERIOD + ticks_us

    # --- wall time ------------------------------------------------------------------
    @property
    def synced(self):
        return self._base_up_us is not None

    def _wall_us(self, uptime_us):
        since = uptime_us - self._base_up_us
        return self._base_unix_us + since + since * self._drift_ppm // 1000000

    def wall_ms_at(self, uptime_ms):
        """Unix ms at an uptime (before or after the last sync), or None before any."""
        if self._base_up_us is None:
            return None
        return self._wall_us(uptime_ms * 1000) // 1000

    def unix_ms(self):
        """Unix milliseconds now, or None before the first sync."""
        return self.wall_ms_at(self.uptime_ms())

    def unix_us(self):
        """Unix microseconds now, or None before the first sync."""
        return None if self._base_up_us is None else self._wall_us(self.uptime_us())

    # --- SNTP -----------------------------------------------------------------------
    async def exchange(self, sock, address):
        """One request: (round trip us, offset us = Unix time - uptime) or None."""
        import asyncio
        packet = self._packet
        packet[0] = 0x23                                # LI 0, version 4, client
        for i in range(1, 40):
            packet[i] = 0
        packet[40:48] = os.urandom(8)                   # echoed by the server
        sock.settimeout(HOLD_MS / 1000)
        await asyncio.sleep_ms(0)                       # the hold's turn: only the exchange
        sent = time.ticks_us()
        sock.sendto(packet, address)
        while True:
            try:
                answer = sock.recv(64)
            except OSError:                             # nothing yet
                answer = None
            got = time.ticks_us()
            if answer is not None and len(answer) >= 48 and answer[24:32] == packet[40:48]:
                break
            if time.ticks_diff(got, sent) > WAIT_MS * 1000:
                return None                             # lost on the air, or only strays
            if answer is None:                          # past HOLD_MS: on the loop
                sock.settimeout(0)
                await asyncio.sleep_ms(POLL_MS)
        await asyncio.sleep_ms(0)                       # both times read: the rest can wait
        if answer[0] & 0x07 != 4 or not 0 < answer[1] < 16 or answer[0] >> 6 == 3:
            return None                                 # not a server, or unsynchronised
        t0, t3 = self.uptime_us(sent), self.uptime_us(got)
        t1, t2 = _ntp_us(answer, 32), _ntp_us(answer, 40)
        return (t3 - t0) - (t2 - t1), ((t1 - t0) + (t2 - t3)) // 2

    async def sync(self, host, port=NTP_PORT, samples=SAMPLES):
        """A few requests to the time server; True once the best answer is applied."""
        import asyncio
        address = socket.getaddrinfo(host, port)[0][-1]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        best = None
        try:
            for i in range(samples):
                if i:
                    await asyncio.sleep_ms(GAP_MS)
                got = await self.exchange(sock, address)
                if got is None and i == 1 and best is None:
                    break                   # two misses: no server there, try later
                if got is not None and (best is None or got[0] < best[0]):
                    best = got
        finally:
            sock.close()
        if best is None:
            return False
        good = best[0] <= MAX_RTT_MS * 1000
        if good or not self.synced:         # a poor first time beats none, until the next
            self._apply(best[0], best[1])
        return good

    def _apply(self, rtt_us, offset_us):
        now_up = self.uptime_us()
        unix_us = now_up + offset_us
        if self._base_up_us is not None:
            self.last_step_us = unix_us - self._wall_us(now_up)
            elapsed = now_up - self._base_up_us
            if elapsed > 60000000:  # a minute at least; half the step: one sample's noise
                drift = self._drift_ppm + self.last_step_us * 500000 // elapsed
                if -MAX_DRIFT_PPM <= drift <= MAX_DRIFT_PPM:
                    self._drift_ppm = drift
        self._base_up_us, self._base_unix_us = now_up, unix_us
        self.last_rtt_us = rtt_us
        self.syncs += 1

    @property
    def drift_ppm(self):
        return self._drift_ppm

    async def run(self, host, port=NTP_PORT, online=None):
        """Sync as soon as `online()` and every SYNC_S, RETRY_S after a miss."""
        import asyncio
        while True:
            self.uptime_ms()    # carries the wrap of ticks_ms whatever else runs
            if online is not None and not online():
                await asyncio.sleep(1)
                continue
            try:
                ok = await self.sync(host, port)
            except OSError:     # no route yet, or the name does not resolve
                ok = False
            await asyncio.sleep(SYNC_S if ok else RETRY_S)


def _ntp_us(buf, at):
    """An NTP timestamp (seconds since 1900, 32.32 fixed point) as Unix microseconds."""
    seconds, fraction = struct.unpack_from(">II", buf, at)
    return (seconds - NTP_TO_UNIX_S) * 1000000 + (fraction * 1000000 >> 32)


CLOCK = Clock()   # the node's one clock

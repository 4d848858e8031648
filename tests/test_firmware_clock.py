"""The node's clock (firmware/node/clock.py) against the pole's time server, a real
chronyd with deploy/chrony.conf (citynode.chrony.PoleTimeServer).

On the MicroPython unix port: a sync on loopback, forged answers refused, the uptime
carried over the tick counter's wrap, the drift learned. On an emulated board: through
its radio, whose datagrams take Wi-Fi-like delays each way (emulator/radio.py Link),
with a crystal 10 ppm fast (the worst ESP-IDF allows); the clock's error is measured
against the host's time, which is chronyd's. The target (p95 within 5 ms) is the
benchmark's (bench-firmware, `clock`); here: it syncs, and no reading is far off.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import pytest

from citynode.chrony import PoleTimeServer
from citynode.testing.emulator import install_firmware, start_emulator
from citynode.testing.firmware import run_async
from citynode.testing.micropython import run_micropython_json


@pytest.fixture
def time_server(tmp_path):
    with PoleTimeServer(tmp_path / "chrony") as server:
        yield server


def test_a_sync_on_loopback_puts_the_clock_within_2_ms(time_server):
    out = run_micropython_json(f"""
import asyncio, json, time
from node.clock import Clock
c = Clock()
before = c.unix_ms()
ok = asyncio.run(c.sync("127.0.0.1", {time_server.port}))
errors = []
for _ in range(5):
    errors.append(c.unix_ms() - time.time_ns() // 1000000)
    time.sleep_ms(50)
print(json.dumps({{"before": before, "ok": ok, "errors": errors, "syncs": c.syncs}}))
""")
    assert out["before"] is None and out["ok"] and out["syncs"] == 1
    assert all(abs(e) <= 2 for e in out["errors"]), out


def rogue_server(answer_for) -> tuple[socket.socket, int]:
    """A UDP responder that answers every request with answer_for(request)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                request, sender = sock.recvfrom(128)
            except OSError:
                return
            sock.sendto(answer_for(request), sender)

    threading.Thread(target=serve, daemon=True).start()
    return sock, sock.getsockname()[1]


def _answer(origin: bytes, first_byte: int = 0x24, stratum: int = 2) -> bytes:
    seconds = struct.pack(">II", 4_000_000_000, 0)        # the year 2026, give or take
    return (bytes([first_byte, stratum]) + bytes(22) + origin + seconds + seconds
            + seconds)


@pytest.mark.parametrize("forgery", ["wrong origin", "not a server", "unsynchronised"])
def test_forged_or_unusable_answers_set_nothing(forgery):
    answers = {
        "wrong origin": lambda req: _answer(b"\x00" * 8),
        "not a server": lambda req: _answer(req[40:48], first_byte=0x23),
        "unsynchronised": lambda req: _answer(req[40:48], first_byte=0xE4),
    }
    sock, port = rogue_server(answers[forgery])
    try:
        out = run_micropython_json(f"""
import asyncio, json
from node.clock import Clock
c = Clock()
print(json.dumps([asyncio.run(c.sync("127.0.0.1", {port}, samples=2)), c.unix_ms()]))
""")
    finally:
        sock.close()
    assert out == [False, None]


def _ntp_now() -> bytes:
    t = time.time() + 2208988800
    return struct.pack(">II", int(t), int((t % 1) * 2**32))


def test_a_slow_answer_is_waited_for_on_the_loop_not_by_holding_it():
    # every answer 60 ms late, past HOLD_MS (15): the sync still succeeds, from answers
    # read on the loop, while a ticker beside it is never held for the wait
    def late(req: bytes) -> bytes:
        time.sleep(0.06)
        now = _ntp_now()
        return bytes([0x24, 2]) + bytes(22) + req[40:48] + now + now

    sock, port = rogue_server(late)
    try:
        out = run_micropython_json(f"""
import asyncio, json, time
from node.clock import Clock, HOLD_MS
c = Clock()
gaps = []
async def ticker():
    while True:
        t = time.ticks_ms()
        await asyncio.sleep_ms(1)
        gaps.append(time.ticks_diff(time.ticks_ms(), t))
async def main():
    asyncio.create_task(ticker())
    return await c.sync("127.0.0.1", {port}, samples=3)
ok = asyncio.run(main())
print(json.dumps({{"ok": ok, "hold": HOLD_MS, "longest": max(gaps), "rtt": c.last_rtt_us,
                   "error": c.unix_ms() - time.time_ns() // 1000000}}))
""")
    finally:
        sock.close()
    assert out["ok"] and out["rtt"] >= 60_000, out
    assert out["longest"] < out["hold"] + 25, out     # blocked for the answer: >= 60 ms
    assert abs(out["error"]) <= out["rtt"] // 2000 + 5, out


def test_a_slow_best_answer_leaves_a_synced_clock_alone(time_server):
    # every answer 150 ms late (past MAX_RTT_MS: the node's loop or its host held it for
    # all of them) and 5 s ahead: applied, it would stamp events up to 75 ms off, and here
    # 5 s. A synced clock keeps its time; one with no time yet takes it; both say to ask
    # again soon (a CI run once stamped a shot 218 ms early, as such a sync would)
    def late_and_ahead(req: bytes) -> bytes:
        time.sleep(0.15)
        t = time.time() + 5 + 2208988800
        now = struct.pack(">II", int(t), int((t % 1) * 2**32))
        return bytes([0x24, 2]) + bytes(22) + req[40:48] + now + now

    sock, port = rogue_server(late_and_ahead)
    try:
        out = run_micropython_json(f"""
import asyncio, json, time
from node.clock import Clock
def error(c):
    return c.unix_ms() - time.time_ns() // 1000000
synced, fresh = Clock(), Clock()
first = asyncio.run(synced.sync("127.0.0.1", {time_server.port}))
late = asyncio.run(synced.sync("127.0.0.1", {port}, samples=2))
late_fresh = asyncio.run(fresh.sync("127.0.0.1", {port}, samples=2))
print(json.dumps([first, late, error(synced), late_fresh, error(fresh)]))
""")
    finally:
        sock.close()
    first, late, synced_error, late_fresh, fresh_error = out
    assert first and not late and abs(synced_error) <= 5, out
    assert not late_fresh and 4800 <= fresh_error <= 5100, out


def test_uptime_carries_over_the_tick_counters_wrap():
    # the ESP32's ticks_ms() wraps at 2**30 ms (12.4 days); the unix port's far later, so
    # the clock reads a stand-in counter here, stepped past the wrap
    out = run_micropython_json("""
import json
import node.clock as clock
ticks = [2**30 - 5]
class FakeTime:
    def ticks_ms(self):
        return ticks[0]
    def ticks_us(self):
        return (ticks[0] * 1000) % 2**30
clock.time = FakeTime()
clock._PERIOD = 2**30
c = clock.Clock()
seen = []
for step in (0, 4, 3, 2**29, 2**29):
    ticks[0] = (ticks[0] + step) % 2**30
    seen.append([c.uptime_ms(), c.uptime_us()])
print(json.dumps(seen))
""")
    start = 2**30 - 5
    want_ms = [start, start + 4, start + 7, start + 7 + 2**29, start + 7 + 2**30]
    assert [ms for ms, _ in out] == want_ms
    assert [us // 1000 for _, us in out] == want_ms       # the us line agrees at every turn


def test_the_drift_between_syncs_is_learned():
    # a crystal 50 ppm fast: between syncs 120 s apart the uptime runs 6 ms ahead of the
    # wall; each sync takes half of what it sees, so the estimate closes in on -50 ppm
    out = run_micropython_json("""
import json
from node.clock import Clock
c = Clock()
now = [0]
c.uptime_us = lambda ticks_us=None: now[0]
UNIX0 = 1_763_900_000_000_000
drifts, errors = [], []
for k in range(8):
    now[0] = k * 120_000_000
    truth = UNIX0 + now[0] - now[0] * 50 // 1_000_000
    if k:
        errors.append(c.wall_ms_at(now[0] // 1000) - truth // 1000)
    c._apply(500, truth - now[0])
    drifts.append(c.drift_ppm)
print(json.dumps({"drifts": drifts, "errors": errors}))
""")
    assert out["drifts"][0] == 0 and out["drifts"][1] == -25
    assert -50 <= out["drifts"][-1] <= -48
    assert abs(out["errors"][0]) == 6 and abs(out["errors"][-1]) <= 1, out


def test_on_an_emulated_board_the_clock_syncs_through_the_radio(tmp_path, time_server):
    emu = start_emulator(tmp_path)
    board = emu.boards[0]
    try:
        install_firmware(board)
        assert board.control("link")["loss"] > 0        # the default link: Wi-Fi-like
        run = run_async(board, f"""
import asyncio, json, time
from node.clock import Clock
from node.wifi import WiFi
async def main():
    w = WiFi("city", "pw")
    assert await w.connect()
    c = Clock()
    ok = await c.sync("127.0.0.1", {time_server.port})
    errors = []
    for _ in range(20):
        errors.append(c.unix_ms() - time._real.time_ns() // 1000000)  # the host's truth
        await asyncio.sleep_ms(100)
    w.wlan.disconnect()
    await asyncio.sleep_ms(100)
    try:
        offline = await c.sync("127.0.0.1", {time_server.port})
    except OSError as exc:
        offline = "OSError %s" % exc
    print(json.dumps({{"ok": ok, "rtt_us": c.last_rtt_us, "errors": errors,
                      "offline": offline}}))
asyncio.run(main())
""", timeout=60)
        out = json.loads(run.result(timeout=60).strip().splitlines()[-1])
    finally:
        emu.stop()
    print(f"\nclock error (ms) {sorted(out['errors'])}, round trip {out['rtt_us']} us")
    assert out["ok"] and out["rtt_us"] >= 4000, out         # up 3 ms and down 2 ms at least
    assert max(abs(e) for e in out["errors"]) <= 25, out
    assert out["offline"] is False or out["offline"].startswith("OSError"), out

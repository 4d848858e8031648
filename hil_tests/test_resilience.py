"""What kills field devices: a hung part, a crash loop, a slow leak."""

from __future__ import annotations

import time

import pytest

from citynode import wire
from citynode.provisioning.device import last_json
from citynode.testing.emulator import wait_for
from hil_tests.bench import APP_STARTED, Bench, records

WDT_RESET = 3     # machine.WDT_RESET on the ESP32 port
CAUSE = "import machine; print(machine.reset_cause())"  # read without a soft reset first


def test_the_watchdog_reboots_a_hung_node_and_says_so(node: Bench):
    node.require_emulator("hangs the I2C bus")
    cfg = node.config()
    node.write_config({**cfg, "wdt_ms": 3000})     # a short dog, so the test is short
    try:
        node.boot_app()
        time.sleep(5)             # healthy: the supervisor feeds the dog past its timeout
        assert node.exec(CAUSE, soft_reset=False).strip() != str(WDT_RESET)
        node.boot_app()
        node.fault("hang")        # the next bus transaction never completes
        out = node.console(APP_STARTED, 30)          # the dog bites, the node boots again
        assert APP_STARTED in out, f"no reboot after the hang:\n{out[-1500:]}"
        cause = node.exec(CAUSE, soft_reset=False).strip()
        assert cause == str(WDT_RESET), f"reset_cause() is {cause}, not WDT_RESET"
    finally:
        node.write_config(cfg)


def test_a_crash_loop_ends_in_safe_mode_with_the_key_kept(node: Bench):
    public = node.exec("from node.keys import NodeKeys; print(NodeKeys().public_key_hex())")
    cfg = node.config()
    # a setting the app only trips over once it runs: it crashes at every boot
    node.write_config({**cfg, "uplink": {"no_such_setting": 1}})
    try:
        console = node.console("SAFE MODE", 90, send=b"\x03\x03\x02\x04")
        assert "SAFE MODE" in console
        assert console.count("unknown uplink setting") >= 3    # three crash-reboots first
        assert node.exec("from node.keys import NodeKeys; "
                         "print(NodeKeys().public_key_hex())") == public
    finally:
        node.write_config(cfg)


def test_safe_mode_says_why_keeps_the_dog_and_tries_again_on_its_own(node: Bench):
    cfg = node.config()
    node.write_config({**cfg, "uplink": {"no_such_setting": 1}, "safe_mode_retry_s": 4})
    try:
        with node.listen() as sub:
            console = node.console("tries again in 8 s", 120, send=b"\x03\x03\x02\x04")
            # safe mode after 3 crashes waited 4 s, reset on its own, crashed once more,
            # and now waits twice as long
            assert "tries again in 4 s" in console and "tries again in 8 s" in console, console
            status = sub.wait(1, timeout=30, kind=wire.KIND_STATUS)
        why = records(status[0])
        assert why["node/safe_mode"] >= 3 and why["node/retry_s"] in (4, 8)
        assert "unknown uplink setting" in why["node/last_crash"]
    finally:
        # mpremote's soft reset stops the retry timer, unless the timer resets the node
        # first, under mpremote: then, as a technician would, try again
        for attempt in range(3):
            try:
                node.write_config(cfg)
                break
            except AssertionError:
                if attempt == 2:
                    raise


HEAP_RUN = """
import asyncio, gc, json
from node import app, config
cfg = config.load()
cfg["wdt_ms"] = 3600000         # the loop below never feeds the dog the app would
n = app.Node(cfg)
async def sample():
    out = []
    for s in n.sensors:
        out += await s.sample()
    return out
marks = {}
async def cycles():
    asyncio.create_task(n.signer.run())     # signs in steps and keeps the nonce pool
    for i in range(%d):
        if i %% 250 == 0:
            readings = await sample()
        for name, unit, value in readings:
            n.window.add(name, unit, value, trimmed=name.startswith("air/pm"))
        n.uplink.spool.put(await n.close_window())
        n.uplink.spool.pop()
        if i in (200, %d):
            while len(n.signer.pool) < n.signer.size:   # the signer at rest: no step's
                await asyncio.sleep_ms(10)              # numbers live at either mark
            gc.collect()
            marks[i] = gc.mem_free()
asyncio.run(cycles())
print(json.dumps(marks))
"""


@pytest.mark.timeout(900)
def test_heap_stays_flat_over_2500_cycles(bench: Bench):
    """Sample, aggregate, encode, sign and spool 2,500 times: no creeping heap (a leak
    of half a byte per cycle would show). Both marks are taken with the signer at rest:
    a pair or a signature half made holds ~3 KB of its steps' numbers."""
    cycles = 2500
    marks = last_json(bench.exec(HEAP_RUN % (cycles, cycles - 1), timeout=900))
    assert abs(marks[str(cycles - 1)] - marks["200"]) < 1024, marks


# The node made first, as at boot; the test's own code is a module imported after it:
# sent with the node's setup in one mpremote exec, its source and parse tree left the
# heap without a 4 KB hole for the node's buffers (2 CI runs of 5).
HEAP_SHORT_SETUP = """
import gc
from node import app, config
cfg = config.load()
cfg["wdt_ms"] = 3600000         # the loop below never feeds the dog the app would
gc.collect()
n = app.Node(cfg)
import heap_short
heap_short.n = n
heap_short.go()
"""

HEAP_SHORT = """
import asyncio, gc, json, time
n = None
hog = None


def fill(hole):
    # the heap as the chip's can be: plenty free, but in no piece of `hole` bytes. The
    # blocks are chained, two words a link: a list of slots needs a piece of its own,
    # which a heap fragmented by the app's start-up may not have (a CI run)
    global hog
    gc.collect()
    size = 4096
    while size >= hole:
        try:
            hog = [bytearray(size), hog]
        except MemoryError:
            size //= 2


async def free_after(ms, taken):
    # the heap back `ms` after the window task took the window (its first try)
    global hog
    while n.window_started == taken:
        await asyncio.sleep_ms(5)
    await asyncio.sleep_ms(ms)
    hog = None


async def main():
    global hog
    asyncio.create_task(n.signer.run())
    while len(n.signer.pool) < n.signer.size:
        await asyncio.sleep_ms(20)
    windows = asyncio.create_task(n.window_loop())
    put = n.uplink.spool.put

    def put_short(data, *rest):
        # while held, the heap short at the spool's copy too: the seal's own garbage,
        # collected by the copy's allocation, made room for its 447 bytes where the test
        # meant none (3 runs of 4 on this host, and two CI runs)
        if hog is not None:
            fill(%d)
        put(data, *rest)
    n.uplink.spool.put = put_short
    # the heap short for good, short for a moment (between its second try and its
    # third), then back
    for lux, short_ms in ((5.0, 1500), (6.0, 150), (7.0, 0)):
        n.window.add("light/lux", "lx", lux)
        if short_ms:
            fill(%d)
        before = len(n.uplink.spool)
        n.window_started = taken = time.ticks_add(time.ticks_ms(), -10 ** 6)
        if short_ms:
            asyncio.create_task(free_after(short_ms, taken))
        await asyncio.sleep_ms(2000)
        hog = None
        gc.collect()
        print(json.dumps([n.errors.get("window", 0), len(n.uplink.spool) - before]))
    print(json.dumps(["alive", not windows.done()]))


def go():
    asyncio.run(main())
"""


def test_a_window_the_heap_has_no_room_for_is_lost_not_the_node(bench: Bench, tmp_path):
    """At chip speed a window's seal raised MemoryError (a fragmented heap: 1,104 bytes
    in one piece) and the app reset. Here the heap is left with no hole as big as a
    window's payload (a real MemoryError from the real allocator). Held so past the
    seal's tries, that window is counted in node/errors/window and lost, and the window
    task goes on; held only until its second try (the heap at chip speed is short for
    a moment, while the audio's and the signer's turns hold memory), it is sealed on
    its third; and with the heap back the next one is sealed and spooled."""
    module = tmp_path / "heap_short.py"
    module.write_text(HEAP_SHORT % (256, 256))
    bench.mpremote("fs", "cp", str(module), ":heap_short.py")
    try:
        out = bench.exec(HEAP_SHORT_SETUP, timeout=120)
    finally:
        bench.mpremote("fs", "rm", ":heap_short.py")
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert lines[0] == "[1, 0]", out          # short of heap: counted, nothing spooled
    assert lines[1] == "[1, 1]", out          # short for a moment: tried again, sealed
    assert lines[2] == "[1, 1]", out          # heap back: sealed and spooled
    assert lines[3] == '["alive", true]', out


def test_the_node_is_back_to_normal(node: Bench):
    """After the faults above, the app runs and publishes again (no lasting damage)."""
    with node.listen() as sub:
        wait_for(lambda: sub.bodies(), timeout=3 * node.window_s + 20, what="an envelope")

"""The node under the things that kill field devices: a long run, a hung part,
crash loops and power cuts — on the emulated board at the devkitc heap."""

from __future__ import annotations

import json

import pytest

from tests.emu import mpremote, start_node, wait_for


@pytest.fixture
def board(tmp_path, local_broker):
    emu, board, device, key = start_node(tmp_path, local_broker)
    yield board
    emu.stop()


def test_heap_stays_flat_over_5000_cycles(board):
    """Sample, aggregate, encode, sign and spool 5,000 times: no creeping heap."""
    code = """
import asyncio, gc, json
from node import app, config
n = app.Node(config.load())
async def sample():
    out = []
    for s in n.sensors:
        out += await s.sample()
    return out
readings = asyncio.run(sample())
marks = {}
for i in range(5000):
    if i % 250 == 0:
        readings = asyncio.run(sample())
    for name, unit, value in readings:
        n.window.add(name, unit, value, trimmed=name.startswith("air/pm"))
    env = n.close_window()
    n.uplink.spool.put(env)
    n.uplink.spool.pop()
    if i in (200, 4999):
        gc.collect()
        marks[i] = gc.mem_free()
print(json.dumps(marks))
"""
    out = mpremote(board.link, "exec", code, timeout=600)
    marks = json.loads(out.strip().splitlines()[-1])
    assert abs(marks["4999"] - marks["200"]) < 1024, marks


def test_sequence_numbers_never_repeat_across_resets_and_power_cuts(board):
    seen: list[int] = []
    read = ("from node import seqno\ns = seqno.Sequence()\n"
            "print([s.next() for _ in range(3)])")
    for fault in ("soft", "hard", "power", "power"):
        seen += json.loads(mpremote(board.link, "exec", read))
        if fault == "soft":
            mpremote(board.link, "soft-reset")
        elif fault == "hard":
            mpremote(board.link, "reset")
            wait_for(lambda: board.control("status")["reset_cause"] == 5, what="reboot")
        else:
            board.control("power", on=False)
            board.control("power", on=True)
        wait_for(lambda: "ok" in mpremote(board.link, "exec", "print('ok')", check=False),
                 timeout=20, what="the REPL")
    seen += json.loads(mpremote(board.link, "exec", read))
    assert len(seen) == len(set(seen)) == 15
    assert seen == sorted(seen)


def _console_until(board, text: str, seconds: float, send: bytes = b"") -> str:
    import time

    import serial

    seen = b""
    with serial.Serial(board.link, timeout=0.2) as port:
        port.write(send)
        deadline = time.monotonic() + seconds
        while text.encode() not in seen and time.monotonic() < deadline:
            seen += port.read(4096)
    return seen.decode(errors="replace")


def test_repeated_crashes_end_in_safe_mode_with_the_key_kept(board):
    public = mpremote(board.link, "exec",
                      "from node.keys import NodeKeys; print(NodeKeys().public_key_hex())")
    # a setting the app only trips over once it starts: it crashes at every boot
    mpremote(board.link, "exec",
             "import json\ncfg = json.load(open('config.json'))\n"
             "cfg['uplink'] = {'no_such_setting': 1}\n"
             "json.dump(cfg, open('config.json', 'w'))")
    console = _console_until(board, "SAFE MODE", 90, send=b"\x02\x04")
    assert "SAFE MODE" in console
    assert console.count("unknown uplink setting") >= 3   # three crash-reboots first
    assert board.control("status")["mode"] == "running"    # the shell is still there
    assert mpremote(board.link, "exec", "from node.keys import NodeKeys; "
                    "print(NodeKeys().public_key_hex())") == public


def test_watchdog_bites_when_a_part_hangs(tmp_path, local_broker):
    emu, board, device, key = start_node(tmp_path, local_broker, extra={"wdt_ms": 3000})
    try:
        assert "starting" in _console_until(board, "starting", 15, send=b"\x02\x04")
        import time

        time.sleep(5)       # healthy: the supervisor feeds the dog past its timeout
        assert board.control("status")["reset_cause"] != 3
        board.control("hang")   # the next bus transaction never completes
        wait_for(lambda: board.control("status")["reset_cause"] == 3, timeout=20,
                 what="the watchdog reset")
    finally:
        emu.stop()

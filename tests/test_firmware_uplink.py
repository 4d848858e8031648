"""The uplink (firmware/node/uplink.py) on an emulated board: nothing lost, order kept.

The board runs a test main.py from power-on (no mpremote attached, as on a pole):
Wi-Fi through node.wifi, the uplink to a real Mosquitto, and real COSE_Mac0
envelopes made beforehand by the firmware's own payload/cose code on the unix
port (read from a file on the board, so the test's heap goes to the transport).
A paho-mqtt subscriber on the host checks every envelope, byte for byte, in order,
and verifies them with citynode.wire. Faults: the access point going away for
several seconds, and a power cut while envelopes sit in the flash spool.
"""

from __future__ import annotations

import json
import signal
import struct
import time

import pytest

from citynode import wire
from citynode.subscriber import Subscriber
from citynode.testing.emulator import install_firmware, wait_for
from citynode.testing.micropython import run_micropython

SECRET = bytes(range(32))
COUNT = 60

MAIN = """
import asyncio, gc, json, struct
from node.fsutil import exists, write_atomic
from node.wifi import WiFi
from node.uplink import Uplink

cfg = json.load(open('uplink_test.json'))
boot = int(open('booted').read()) + 1 if exists('booted') else 1
open('booted', 'w').write(str(boot))
first, count = cfg['batches'][boot - 1]
sent = 0
downlinks = []


async def on_downlink(payload):  # a coroutine: the uplink runs it as a task
    downlinks.append(payload.decode())


def envelopes():
    with open('envs.bin', 'rb') as f:
        for i in range(first + count):
            n = struct.unpack('<H', f.read(2))[0]
            if i < first:
                f.seek(n, 1)
            else:
                yield f.read(n)


async def report(up, w):
    low = 1 << 30
    while True:
        gc.collect()
        low = min(low, gc.mem_free())  # live data only: the uplink's real footprint
        st = up.stats()
        st.update(boot=boot, sent=sent, ram=up.spool.ram_len(), wifi_drops=w.drops,
                  downlink=downlinks, min_free=low, heap=gc.mem_free() + gc.mem_alloc())
        write_atomic('status.json', json.dumps(st).encode())
        await asyncio.sleep_ms(100)


async def main():
    global sent
    w = WiFi('city', 'pw', backoff_min_ms=200, backoff_max_ms=1000)
    w.start()
    up = Uplink(cfg['device'], cfg['host'], cfg['port'], cfg['uplink'], wifi=w,
                on_downlink=on_downlink)
    up.start()
    asyncio.create_task(report(up, w))
    for env in envelopes():
        await up.send(env)
        sent += 1
        await asyncio.sleep_ms(cfg['period_ms'])
    while True:
        await asyncio.sleep_ms(1000)

asyncio.run(main())
"""

UPLINK = {"keepalive": 5, "timeout_ms": 2000, "ack_timeout_ms": 2000, "backoff_min_ms": 200,
          "backoff_max_ms": 1000, "flush_ms": 300, "ram_count": 8,
          # relative: the emulated board's os.rename fails (ENOENT) on absolute paths
          # (MicroPython unix VfsPosix mounted with a root), see the report
          "spool_dir": "data/spool"}


def make_envelopes(device: str, count: int) -> list[bytes]:
    """Real COSE_Mac0 envelopes from the firmware's own code (unix port), seq 0..count-1."""
    out = run_micropython(
        "from node import cose, payload\n"
        f"for seq in range({count}):\n"
        f"    p = payload.encode_payload({device!r}, seq, 1, 1000 * seq, 0,\n"
        "        [('light/lux', 'lx', 10 + seq / 4), ('noise/laeq', 'dBA', 55.5),\n"
        "         ('node/status', None, 'x' * (seq * 7 % 200))])\n"
        f"    print(cose.mac0(p, {device!r}, {SECRET!r}).hex())\n")
    return [bytes.fromhex(line) for line in out.split()]


def status(board) -> dict:
    path = board.state / "fs" / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def wait_status(board, pred, timeout=30, what="board status"):
    return wait_for(lambda: (lambda s: s if s and pred(s) else None)(status(board)),
                    timeout=timeout, interval=0.05, what=what)


def check_in_order(received: list[bytes], expected: list[bytes]) -> None:
    """Every expected envelope arrived, in order; a repeat is only the same bytes again."""
    first_seen: list[bytes] = []
    for env in received:
        assert env in expected, "an envelope that was never sent arrived"
        if env not in first_seen:
            first_seen.append(env)
    assert first_seen == expected
    for env in received:  # and they are genuine, with seq rising
        wire.verify_hmac(wire.decode_envelope(env), SECRET)
    seqs = [wire.decode_payload(wire.decode_envelope(e)).seq for e in first_seen]
    assert seqs == sorted(seqs)


@pytest.fixture
def pole(emu_board, local_broker):
    """The board, powered off with the test main.py, envelopes and config installed."""
    device = "cn-" + emu_board.mac
    envs = make_envelopes(device, COUNT)
    install_firmware(emu_board)   # the modules go to ROMFS while the board is up
    emu_board.control("power", on=False)

    def setup(batches, period_ms, **uplink):
        cfg = {"device": device, "host": local_broker.host, "port": local_broker.port,
               "batches": batches, "period_ms": period_ms, "uplink": {**UPLINK, **uplink}}
        fs = emu_board.state / "fs"
        (fs / "main.py").write_text(MAIN)
        (fs / "uplink_test.json").write_text(json.dumps(cfg))
        (fs / "envs.bin").write_bytes(
            b"".join(struct.pack("<H", len(e)) + e for e in envs))
    sub = Subscriber(local_broker.host, local_broker.port, f"citynode/up/{device}")
    yield emu_board, setup, envs, sub, device
    sub.close()
    if local_broker.running:
        local_broker.proc.send_signal(signal.SIGCONT)


def test_wifi_outage_loses_nothing_and_keeps_order(pole):
    board, setup, envs, sub, device = pole
    setup([[0, COUNT]], period_ms=80)
    started = time.monotonic()
    board.control("power", on=True)
    wait_status(board, lambda s: s["published"] >= 15, what="first envelopes published")
    board.control("wifi", up=False)
    try:
        before = len(sub.payloads())
        time.sleep(4)
        during = status(board)
        assert len(sub.payloads()) == before  # the link is really gone
        assert not during["connected"] and during["spooled"] > 0 and during["depth"] > 0
        # a command sent while the node is away waits in its broker session (clean=False)
        sub.publish(f"citynode/down/{device}", b"while-offline")
    finally:
        board.control("wifi", up=True)
    got = sub.wait_count(COUNT, timeout=30)
    sub.publish(f"citynode/down/{device}", b"online")
    wait_status(board, lambda s: s["downlink"] == ["while-offline", "online"],
                what="both downlink commands, in order")
    final = wait_status(board, lambda s: s["depth"] == 0 and s["sent"] == COUNT)
    elapsed = time.monotonic() - started
    check_in_order(got, envs)
    assert final["published"] >= COUNT and final["dropped"] == 0
    assert final["reconnects"] >= 1 and final["wifi_drops"] >= 1
    print(f"\noutage: {COUNT} envelopes, {during['depth']} spooled during 4 s without Wi-Fi, "
          f"{len(got) - COUNT} duplicates, {final['flash_writes']} flash writes, "
          f"{elapsed:.1f} s; last error: {final['last_error']}; lowest free heap "
          f"{final['min_free']} of {final['heap']} B")
    assert final["min_free"] > 8 * 1024  # the transport leaves the app room on a devkitc


def test_power_cut_with_envelopes_in_flash_sends_them_after_power_on(pole):
    board, setup, envs, sub, _ = pole
    setup([[0, 20], [20, 10]], period_ms=30)
    board.control("wifi", up=False)  # the pole's access point is down from the start
    board.control("power", on=True)
    spooled = wait_status(board, lambda s: s["sent"] == 20 and s["ram"] == 0,
                          what="20 envelopes spooled to flash")
    assert spooled["depth"] == 20 and not spooled["connected"] and spooled["published"] == 0
    board.control("power", on=False)  # cut: the VM dies where it is
    dat = board.state / "fs" / "data" / "spool" / "spool.dat"
    assert dat.exists() and dat.stat().st_size > 20 * 7
    assert sub.payloads() == []
    board.control("wifi", up=True)
    board.control("power", on=True)
    got = sub.wait_count(30, timeout=30)
    final = wait_status(board, lambda s: s["boot"] == 2 and s["depth"] == 0 and s["sent"] == 10)
    check_in_order(got, envs[:30])  # the 20 from flash first, then the 10 of the new boot
    assert final["torn"] == 0 and final["dropped"] == 0
    assert not dat.exists()  # drained: the spool file is gone



def test_power_cut_in_the_middle_of_a_drain_resends_but_never_skips(pole, local_broker):
    """Boot 1 spools 40 offline; boot 2 drains them until the broker freezes, then the
    power goes; boot 3 finishes. The head pointer is saved every 4 records."""
    board, setup, envs, sub, _ = pole
    setup([[0, 40], [40, 5], [45, 5]], period_ms=20, head_every=4)
    board.control("wifi", up=False)
    board.control("power", on=True)
    wait_status(board, lambda s: s["sent"] == 40 and s["ram"] == 0, what="40 in flash")
    board.control("power", on=False)

    # boot 2: the broker freezes after the 10th envelope, so PUBACKs stop mid-drain
    frozen = []

    def freeze(message):
        sub.keep(message)
        if len(sub.messages) == 10 and not frozen:
            local_broker.proc.send_signal(signal.SIGSTOP)
            frozen.append(True)
    sub.on_message = freeze
    board.control("wifi", up=True)
    board.control("power", on=True)
    wait_for(lambda: frozen, timeout=30, what="the drain to start")
    # no PUBACK: after ack_timeout the uplink drops the link and, offline, moves boot 2's
    # own 5 envelopes from RAM to flash (flush_ms)
    wait_status(board, lambda s: s["boot"] == 2 and s["sent"] == 5 and s["ram"] == 0
                and s["failed"] >= 1, what="boot 2's envelopes in flash")
    board.control("power", on=False)  # cut while the broker is stuck
    local_broker.proc.send_signal(signal.SIGCONT)
    board.control("power", on=True)   # boot 3 drains what is left, then its own 5
    final = wait_status(board, lambda s: s["boot"] == 3 and s["depth"] == 0 and s["sent"] == 5)
    got = sub.wait_count(50, timeout=30)
    time.sleep(0.5)
    got = sub.payloads()
    # everything arrives, in order; repeats (from the last saved head) are identical bytes
    check_in_order(got, envs[:50])
    seqs = [envs.index(e) for e in got]
    print(f"\nmid-drain cut: arrival order {seqs}")
    assert 0 < len(got) - len(set(got)) <= 4 + 2  # at most head_every (+ the one in flight)
    assert final["torn"] == 0

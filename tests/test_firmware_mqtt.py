"""The node's MQTT 3.1.1 client (firmware/node/mqtt.py) against a real Mosquitto.

Packet encoding is checked on the MicroPython unix port against bytes written out
from the spec here; everything else runs on an emulated esp32-devkitc (its 110 KB
heap, its Wi-Fi) through unmodified mpremote, with a paho-mqtt client on the host
on the other side of the broker.
"""

from __future__ import annotations

import re
import signal
import struct
import time

import pytest

from citynode.mosquitto import Mosquitto
from citynode.subscriber import Subscriber
from citynode.testing.emulator import install_firmware, mpremote
from citynode.testing.firmware import (
    run_async,
    signal_board,
    stop_leftovers,
    wait_file,
)
from citynode.testing.micropython import run_micropython

WIFI = ("import asyncio, gc, os, time\nfrom node.wifi import WiFi\n"
        "assert asyncio.run(WiFi('city', 'pw').connect())\n")


def board_code(broker, body: str) -> str:
    """A board script: Wi-Fi up, then `body` as the inside of `async def main()`."""
    lines = "\n".join("    " + line for line in body.strip("\n").splitlines())
    return (WIFI + "from node.mqtt import Client, ConnectionLost, ConnectRefused, Timeout\n"
            f"HOST, PORT = {broker.host!r}, {broker.port}\n"
            "def mark(name, text=''):\n    open(name, 'w').write(text)\n"
            "async def wait_mark(name):\n"
            "    while name not in os.listdir():\n        await asyncio.sleep_ms(20)\n"
            "    os.remove(name)\n"
            f"async def main():\n{lines}\n"
            "asyncio.run(main())\n")


@pytest.fixture(autouse=True)
def _no_leftover_scripts():
    yield
    stop_leftovers()


@pytest.fixture(scope="module")
def board(shared_board):
    install_firmware(shared_board)
    yield shared_board


# --- encoding, on the unix port --------------------------------------------------------

def test_remaining_length_is_the_spec_encoding():
    cases = {0: "00", 127: "7f", 128: "8001", 16383: "ff7f", 16384: "808001",
             2097151: "ffff7f", 2097152: "80808001", 268435455: "ffffff7f"}
    out = run_micropython(
        "from node.mqtt import _varlen\n"
        f"for n in {list(cases)}:\n    print(n, _varlen(n).hex())\n"
        "for n in (268435456, -1):\n"
        "    try:\n        _varlen(n)\n    except ValueError:\n        print(n, 'refused')\n")
    got = dict(line.split() for line in out.splitlines())
    assert got == {**{str(k): v for k, v in cases.items()},
                   "268435456": "refused", "-1": "refused"}


def _spec_str(s: bytes) -> bytes:
    return struct.pack("!H", len(s)) + s


def test_connect_packet_has_every_field_in_spec_order():
    out = run_micropython(
        "from node.mqtt import connect_packet\n"
        "print(connect_packet('cn-1', 30, clean=False, will=('st/cn-1', b'gone', 1, True),"
        " user='u', password='p').hex())\n"
        "print(connect_packet('cn-1', 0).hex())\n"
        "try:\n    connect_packet('x', 5, password='p')\nexcept ValueError as e:\n    print(e)\n")
    full, bare, err = out.splitlines()
    # flags: user 0x80 | password 0x40 | will retain 0x20 | will QoS 1 (0x08) | will 0x04
    body = (_spec_str(b"MQTT") + b"\x04" + bytes([0x80 | 0x40 | 0x20 | 0x08 | 0x04])
            + struct.pack("!H", 30) + _spec_str(b"cn-1") + _spec_str(b"st/cn-1")
            + _spec_str(b"gone") + _spec_str(b"u") + _spec_str(b"p"))
    assert bytes.fromhex(full) == b"\x10" + bytes([len(body)]) + body
    body = _spec_str(b"MQTT") + b"\x04\x02\x00\x00" + _spec_str(b"cn-1")
    assert bytes.fromhex(bare) == b"\x10" + bytes([len(body)]) + body
    assert "password only with a user" in err


# --- on the emulated board, against Mosquitto -------------------------------------------

def test_qos1_publish_reaches_a_host_subscriber_in_order(board, local_broker):
    sub = Subscriber(local_broker.host, local_broker.port)
    try:
        out = mpremote(board.link, "exec", board_code(local_broker, """
c = Client('cn-mqtt-test', HOST, PORT, keepalive=30)
print('session', await c.connect())
big = memoryview(bytes(range(256)) * 16)  # one buffer: the emulated heap is fragmented
for i in range(20):
    print('pid', await c.publish('citynode/up/cn-mqtt-test', big[:i * 200 + 96], qos=1))
await c.publish('citynode/up/cn-mqtt-test', b'qos0', qos=0)
c.max_packet = 2048
try:
    await c.publish('citynode/up/cn-mqtt-test', big, qos=1)
except ValueError as e:
    print('refused', e)
c.max_packet = 8192
msg = b'y' * 300
gc.collect()
heap = gc.mem_alloc()
t = time.ticks_ms()
for i in range(200):
    await c.publish('citynode/up/bench', msg, qos=1)
dt = time.ticks_diff(time.ticks_ms(), t)
gc.collect()
print('rate', 200 * 1000 // max(dt, 1), 'heap_growth', gc.mem_alloc() - heap)
await c.disconnect()
print('error', c.error)
"""), timeout=60)
        got = sub.wait_count(221)
    finally:
        sub.close()
    assert "session False" in out
    pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
    assert pids == list(range(1, 21))  # one id per QoS 1 message, each acked before the next
    mine = [p for t, p in sub.messages if t == "citynode/up/cn-mqtt-test"]
    big = bytes(range(256)) * 16
    assert mine == [big[:i * 200 + 96] for i in range(20)] + [b"qos0"]
    assert "refused PUBLISH of 4124 bytes is over max_packet (2048)" in out
    rate = int(re.search(r"rate (\d+)", out).group(1))
    growth = int(re.search(r"heap_growth (-?\d+)", out).group(1))
    print(f"\nboard QoS 1 publish rate (300 B, PUBACK each): {rate}/s; heap growth {growth} B")
    assert rate > 50
    assert growth < 2048  # nothing piles up per message
    assert "disconnected by the client" in out
    assert len(got) == 221


def test_an_envelope_sent_to_an_idle_uplink_leaves_in_the_senders_turn(board, local_broker):
    """The uplink's publisher, woken, would run only after every task waiting for the
    loop (~40 ms of an impulse's 250 at chip speed): when it is idle, send() writes the
    envelope itself. Here the sender then holds the loop, and the broker has it anyway;
    the publisher takes its PUBACK afterwards, and what comes next goes after it."""
    sub = Subscriber(local_broker.host, local_broker.port, "citynode/up/cn-early")
    try:
        run = run_async(board, board_code(local_broker, """
from node.uplink import Uplink
up = Uplink('cn-early', HOST, PORT, {'spool_dir': None})
up.start()
while not up.connected:
    await asyncio.sleep_ms(20)
await asyncio.sleep_ms(300)  # the publisher is waiting for work
await up.send(b'first')
mark('sent')
t = time.ticks_ms()
while 'seen' not in os.listdir() and time.ticks_diff(time.ticks_ms(), t) < 5000:
    time.sleep_ms(20)        # the loop held: the publisher task cannot run
print('seen_while_held', 'seen' in os.listdir())
await up.send(b'second')
await up.send(b'third')
t = time.ticks_ms()
while up.published < 3 and time.ticks_diff(time.ticks_ms(), t) < 5000:
    await asyncio.sleep_ms(20)
print('published', up.published, 'queued', len(up.spool), 'failed', up.failed)
"""))
        wait_file(board, "sent", timeout=30, run=run)
        seen = sub.wait_count(1, timeout=3)
        signal_board(board, "seen")
        out = run.result(60)
        got = sub.wait_count(3, timeout=10)
    finally:
        sub.close()
        for name in ("sent", "seen"):
            (board.state / "fs" / name).unlink(missing_ok=True)
    assert seen == [b"first"]
    assert "seen_while_held True" in out
    assert got == [b"first", b"second", b"third"]
    assert "published 3 queued 0 failed 0" in out


def test_downlink_subscribe_receive_and_oversize_dropped(board, local_broker):
    sub = Subscriber(local_broker.host, local_broker.port, "citynode/none")
    run = run_async(board, board_code(local_broker, """
got = []
c = Client('cn-dl-test', HOST, PORT, keepalive=30, max_packet=1024,
           on_message=lambda t, p, r: got.append((t, p)))
await c.connect()
print('granted', await c.subscribe('citynode/down/cn-dl-test', 1))
mark('subscribed')
t = time.ticks_ms()
while len(got) < 3 and time.ticks_diff(time.ticks_ms(), t) < 10000:
    await asyncio.sleep_ms(20)
print('got', got)
print('oversize', c.oversize, 'received', c.received, 'connected', c.connected)
await c.disconnect()
"""))
    try:
        wait_file(board, "subscribed", run=run)
        sub.publish("citynode/down/cn-dl-test", b"cmd-1")
        sub.publish("citynode/down/cn-dl-test", b"z" * 5000)  # over max_packet
        sub.publish("citynode/down/cn-dl-test", b"cmd-2", qos=0)
        sub.publish("citynode/down/cn-dl-test", b"\x00" * 600)
        out = run.result(60)
    finally:
        sub.close()
        (board.state / "fs" / "subscribed").unlink(missing_ok=True)
    assert "granted 1" in out
    assert ("got [('citynode/down/cn-dl-test', b'cmd-1'), ('citynode/down/cn-dl-test', b'cmd-2'),"
            " ('citynode/down/cn-dl-test', b'" + "\\x00" * 600 + "')]") in out
    assert "oversize 1 received 3 connected True" in out


def test_keepalive_holds_an_idle_link_and_detects_a_silent_broker(board, local_broker):
    run = run_async(board, board_code(local_broker, """
c = Client('cn-ka-test', HOST, PORT, keepalive=2)
await c.connect()
await asyncio.sleep_ms(5000)  # Mosquitto drops a silent client after 1.5 x keepalive
print('idle', c.connected, c.pings)
mark('idle-done')
await wait_mark('stopped')
t = time.ticks_ms()
try:
    await c.publish('citynode/up/cn-ka-test', b'unanswered', qos=1, timeout_ms=800)
except Timeout as e:
    print('publish', e, time.ticks_diff(time.ticks_ms(), t))
while c.connected and time.ticks_diff(time.ticks_ms(), t) < 10000:
    await asyncio.sleep_ms(50)
print('detected_ms', time.ticks_diff(time.ticks_ms(), t), 'error', c.error)
"""))
    wait_file(board, "idle-done", timeout=30, run=run)
    local_broker.proc.send_signal(signal.SIGSTOP)  # alive TCP, no answers: a half-open link
    signal_board(board, "stopped")
    try:
        out = run.result(60)
    finally:
        local_broker.proc.send_signal(signal.SIGCONT)
        (board.state / "fs" / "idle-done").unlink(missing_ok=True)
    connected, pings = re.search(r"idle (\w+) (\d+)", out).groups()
    assert connected == "True" and int(pings) >= 2
    assert "exceeded timeout" not in local_broker.log()
    waited = int(re.search(r"publish no PUBACK for packet 1 from the broker within 800 ms (\d+)",
                           out).group(1))
    # not before the timeout (less one ms: the test's ticks_ms() reads truncate, CI saw
    # 799), and in time for the caller to spool and retry
    assert 799 <= waited < 1500
    detected = int(re.search(r"detected_ms (\d+)", out).group(1))
    assert detected <= 3500
    assert "no answer from the broker for 2 s (keepalive)" in out


def test_broker_stopped_gives_a_clear_error_then_reconnects(board, local_broker):
    run = run_async(board, board_code(local_broker, """
from node.backoff import Backoff
c = Client('cn-rc-test', HOST, PORT, keepalive=10, timeout_ms=3000)
await c.connect()
await c.publish('citynode/up/cn-rc-test', b'before', qos=1)
mark('published')
t = time.ticks_ms()
while c.connected and time.ticks_diff(time.ticks_ms(), t) < 5000:
    await asyncio.sleep_ms(20)
print('lost', c.error)
try:
    await c.publish('citynode/up/cn-rc-test', b'lost', qos=1)
except ConnectionLost as e:
    print('publish', e)
backoff = Backoff(100, 800)
errors = []
while True:
    try:
        await c.connect()
        break
    except ConnectionLost as e:
        errors.append(str(e))
        if len(errors) == 1:
            mark('refused')
        await asyncio.sleep_ms(backoff.next_ms())
print('first', errors[0])
print('attempts', len(errors))
import os
while 'go' not in os.listdir():  # the host subscriber is listening again
    await asyncio.sleep_ms(20)
await c.publish('citynode/up/cn-rc-test', b'after', qos=1)
print('published again')
await c.disconnect()
"""))
    wait_file(board, "published", run=run)
    local_broker.stop()
    wait_file(board, "refused", run=run)
    local_broker.start()
    sub = Subscriber(local_broker.host, local_broker.port)
    (board.state / "fs" / "go").touch()
    try:
        out = run.result(60)
        got = sub.wait_count(1)
    finally:
        sub.close()
        for name in ("published", "refused", "go"):
            (board.state / "fs" / name).unlink(missing_ok=True)
    assert "lost connection closed by the broker" in out or "lost socket error" in out
    assert "publish connection closed by the broker" in out or "publish socket error" in out
    assert re.search(r"first cannot reach 127\.0\.0\.1:\d+|first connection closed by the broker|"
                     r"first socket error", out), out
    assert int(re.search(r"attempts (\d+)", out).group(1)) >= 1
    assert "published again" in out
    assert got == [b"after"]


def test_last_will_only_when_the_node_vanishes(board, local_broker):
    sub = Subscriber(local_broker.host, local_broker.port, "citynode/status/#")
    try:
        mpremote(board.link, "exec", board_code(local_broker, """
will = ('citynode/status/cn-will-test', b'offline', 1, True)
c = Client('cn-will-test', HOST, PORT, will=will)
await c.connect()
await c.disconnect()          # a goodbye: no will
c = Client('cn-will-test', HOST, PORT, will=will)
await c.connect()
await c.publish('citynode/status/cn-will-test', b'online', qos=1, retain=True)
c.close()                     # gone without DISCONNECT: the broker publishes the will
"""), timeout=60)
        sub.wait_count(2)
        time.sleep(0.5)
    finally:
        sub.close()
    assert sub.messages == [("citynode/status/cn-will-test", b"online"),
                            ("citynode/status/cn-will-test", b"offline")]


def test_connack_refusal_is_a_clear_exception(board, tmp_path):
    # Mosquitto closes right after a refusing CONNACK: the refusal must win over the
    # connection loss that follows it, and say what the technician can do.
    with Mosquitto(tmp_path / "closed", extra_config="allow_anonymous false") as broker:
        out = mpremote(board.link, "exec", board_code(broker, """
for i in range(5):
    c = Client('cn-auth-test', HOST, PORT)
    try:
        await c.connect()
    except ConnectRefused as e:
        print('code', e.code, 'msg', e, 'connected', c.connected)
"""), timeout=60)
    assert out.count("code 5 msg broker refused the connection: not authorized (re-run "
                     "citynode-provision, then reload the pole's gateway) (CONNACK code 5) "
                     "connected False") == 5


def test_no_wifi_is_a_clear_error(board, local_broker):
    board.control("wifi", up=False)
    try:
        started = time.monotonic()
        out = mpremote(board.link, "exec",
                       "import asyncio\nfrom node.mqtt import Client, ConnectionLost\n"
                       f"c = Client('cn-x', {local_broker.host!r}, {local_broker.port})\n"
                       "try:\n    asyncio.run(c.connect())\n"
                       "except ConnectionLost as e:\n    print('error', e)\n", timeout=30)
        assert time.monotonic() - started < 10
    finally:
        board.control("wifi", up=True)
    assert f"error cannot reach 127.0.0.1:{local_broker.port}: socket error -202" in out

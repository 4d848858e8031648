"""Wi-Fi (firmware/node/wifi.py) on an emulated board whose access point has a password,
and the reconnect backoff (firmware/node/backoff.py) on the MicroPython unix port."""

from __future__ import annotations

import json
import time

from citynode.testing.emulator import install_firmware, mpremote, start_emulator
from citynode.testing.firmware import run_async, wait_file
from citynode.testing.micropython import run_micropython


def test_backoff_doubles_to_the_cap_with_jitter_and_resets():
    out = run_micropython(
        "import json\nfrom node.backoff import Backoff\n"
        "b = Backoff(100, 1600)\n"
        "runs = [[b.next_ms() for _ in range(7)] for _ in range(40) if b.reset() is None]\n"
        "print(json.dumps(runs))\n")
    runs = json.loads(out)
    caps = [100, 200, 400, 800, 1600, 1600, 1600]
    for run in runs:
        assert all(cap // 2 <= d <= cap for d, cap in zip(run, caps, strict=True)), run
    assert len({tuple(r) for r in runs}) > 30  # jitter: boards do not retry in step
    assert len({r[4] for r in runs}) > 10


def test_connect_status_rssi_and_reconnect_after_the_ap_returns(tmp_path):
    (tmp_path / "psk").write_text("s3cret")
    emu = start_emulator(tmp_path, extra=["--wifi-ssid", "city", "--wifi-password-file",
                                          str(tmp_path / "psk")])
    board = emu.boards[0]
    try:
        install_firmware(board)
        out = mpremote(board.link, "exec", (
            "import asyncio\nfrom node.wifi import WiFi\n"
            "bad = WiFi('city', 'wrong', timeout_ms=3000)\n"
            "print('bad', asyncio.run(bad.connect()), bad.last_status, bad.rssi())\n"
            "missing = WiFi('elsewhere', 's3cret', timeout_ms=4000)\n"
            "print('missing', asyncio.run(missing.connect()), missing.last_status)\n"
            "ok = WiFi('city', 's3cret')\n"
            "print('ok', asyncio.run(ok.connect()), ok.status(), ok.rssi() < 0)\n"), timeout=30)
        assert "bad False 202 None" in out  # wrong password: given up at once, not after 3 s
        assert "missing False 201" in out   # once a scan (~2 s) has not found it
        assert "ok True (1010, 'connected') True" in out

        run = run_async(board, (
            "import asyncio, time\nfrom node.wifi import WiFi\n"
            "w = WiFi('city', 's3cret', backoff_min_ms=100, backoff_max_ms=400)\n"
            "async def main():\n"
            "    w.start()\n"
            "    await w.wait_connected(5000)\n"
            "    open('up', 'w').close()\n"
            "    while w.isconnected():\n        await asyncio.sleep_ms(20)\n"
            "    print('down', w.status())\n"
            "    t = time.ticks_ms()\n"
            "    while not w.isconnected():\n        await asyncio.sleep_ms(20)\n"
            "    await asyncio.sleep_ms(700)\n"
            "    print('back', w.connects, w.drops, w.isconnected())\n"
            "asyncio.run(main())\n"))
        wait_file(board, "up", run=run)
        board.control("wifi", up=False)
        time.sleep(2)
        board.control("wifi", up=True)
        out = run.result(30)
        # lost beacon: the port retries on its own (connecting), or has already failed
        # to find the access point again
        assert "down (1001, 'connecting')" in out or \
            "down (201, 'access point not found')" in out
        assert "back 2 1 True" in out
    finally:
        emu.stop()


def test_no_key_is_made_with_the_radio_off(tmp_path):
    # Espressif: the RNG is truly random only while Wi-Fi (or Bluetooth) runs
    emu = start_emulator(tmp_path)
    board = emu.boards[0]
    try:
        install_firmware(board)
        out = mpremote(board.link, "exec", (
            "import network\nfrom node.keys import NodeKeys, RadioOff\n"
            "sta = network.WLAN(network.STA_IF)\nsta.active(False)\n"
            "k = NodeKeys('/keytest')\n"
            "try:\n    k.create()\nexcept RadioOff as e:\n    print('refused', e)\n"
            "print('key after refusal', k.has_key())\n"
            "sta.active(True)\nprint('made', len(k.create()), k.has_key())\n"))
    finally:
        emu.stop()
    assert "refused the radio is off, so the RNG is not random" in out, out
    assert "key after refusal False" in out and "made 65 True" in out, out

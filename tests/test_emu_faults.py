"""What the emulated board does under the faults a pole sees, seen from the board side."""

from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor

from citynode.testing.emulator import hard_reset, mpremote, start_emulator, wait_for


def _echo(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(1024):
                conn.sendall(data)
        except OSError:
            pass  # the link was cut under us: that is the point of some tests


def _echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_the_firmware_gets_the_board_heap_and_no_more(emu_board):
    out = mpremote(emu_board.link, "exec",
                   "import gc; gc.collect(); print(gc.mem_free())\n"
                   "try:\n    b = bytearray(300_000)\n"
                   "except MemoryError:\n    print('MemoryError')")
    free, result = out.split()
    # esp32-devkitc: ~110 KB free after boot, counted in 64-bit bytes (twice the chip's)
    assert 2 * 100 * 1024 < int(free) <= 2 * 112 * 1024
    assert result == "MemoryError"


def test_wifi_link_carries_real_sockets_and_drops_them(emu_board):
    server, port = _echo_server()
    connect = ("import network, time, socket\n"
               "w = network.WLAN(network.STA_IF); w.active(True); w.connect('city', 'pw')\n"
               "t = time.ticks_ms()\n"
               "while not w.isconnected() and time.ticks_diff(time.ticks_ms(), t) < 5000:\n"
               "    time.sleep_ms(50)\n"
               "print(w.isconnected(), w.status('rssi') < 0)\n")
    echo = (f"s = socket.socket(); s.connect(socket.getaddrinfo('127.0.0.1', {port})[0][-1])\n"
            "s.write(b'ping'); print(s.read(4)); s.close()\n")
    out = mpremote(emu_board.link, "exec", connect + echo)
    assert out.split() == ["True", "True", "b'ping'"]

    emu_board.control("wifi", up=False)
    out = mpremote(emu_board.link, "exec",
                   "import network, socket\nprint(network.WLAN().isconnected())\n"
                   f"try:\n    socket.getaddrinfo('127.0.0.1', {port})\n"
                   "except OSError as e:\n    print('down', e.errno)\n")
    assert out.split() == ["False", "down", "-202"]

    emu_board.control("wifi", up=True)
    out = mpremote(emu_board.link, "exec",
                   "import network, time, socket\nw = network.WLAN()\nt = time.ticks_ms()\n"
                   "while not w.isconnected() and time.ticks_diff(time.ticks_ms(), t) < 5000:\n"
                   "    time.sleep_ms(50)\n" + echo)
    assert out.split() == ["b'ping'"]
    server.close()


def test_an_open_connection_dies_with_the_link(emu_board):
    server, port = _echo_server()
    code = ("import network, time, socket\n"
            "w = network.WLAN(network.STA_IF); w.active(True); w.connect('city', 'pw')\n"
            "while not w.isconnected():\n    time.sleep_ms(50)\n"
            f"s = socket.socket(); s.connect(socket.getaddrinfo('127.0.0.1', {port})[0][-1])\n"
            "s.write(b'a'); print(s.read(1))\n"
            "open('ready', 'w').close()\n"
            "while 'cut' not in __import__('os').listdir():\n    time.sleep_ms(20)\n"
            "try:\n    s.write(b'b'); print('read', s.read(1))\nexcept OSError as e:\n"
            "    print('error', e.errno)\n")
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=mpremote(
        emu_board.link, "exec", code, timeout=60)))
    worker.start()
    fs = emu_board.state / "fs"
    wait_for(lambda: (fs / "ready").exists(), timeout=20, what="the connection")
    emu_board.control("wifi", up=False)
    (fs / "cut").touch()
    worker.join(60)
    words = result["out"].split()
    assert words[0] == "b'a'"
    assert words[1:] in (["read", "b''"], ["error", "104"], ["error", "32"])
    server.close()


def test_power_cut_keeps_flash_as_it_was_and_boots_cold(emu_board):
    mpremote(emu_board.link, "exec",
             "import time, machine\n"
             "machine.RTC().datetime((2026, 11, 23, 0, 12, 0, 0, 0))\n"
             "open('log.txt', 'w').write('before\\n')")
    assert emu_board.control("status")["mode"] == "running"
    emu_board.control("power", on=False)
    assert emu_board.control("status")["mode"] == "off"
    assert (emu_board.state / "fs" / "log.txt").read_text() == "before\n"
    emu_board.control("power", on=True)
    out = wait_for(lambda: mpremote(emu_board.link, "resume", "exec",  # no soft reset first
                                    "import machine, time\n"
                                    "print(machine.reset_cause(), time.localtime()[0], "
                                    "open('log.txt').read().strip())", check=False),
                   timeout=20, what="the board after power-on")
    assert out.split() == ["1", "2000", "before"]  # PWRON_RESET; the RTC lost its time


def test_watchdog_bites_a_hung_board(emu_board):
    main = ("import machine, time\nwdt = machine.WDT(timeout=700)\ni2c = machine.I2C(0)\n"
            "while True:\n"
            "    try:\n        i2c.scan()\n    except OSError:\n        pass\n"
            "    wdt.feed()\n    time.sleep_ms(50)\n")
    mpremote(emu_board.link, "exec", f"open('main.py','w').write({main!r})")
    hard_reset(emu_board)
    assert emu_board.control("status")["reset_cause"] == 2  # HARD_RESET, into main.py
    threading.Event().wait(0.5)
    boots = emu_board.control("status")["boots"]
    # healthy: the loop feeds the dog and nothing happens for well over the timeout
    threading.Event().wait(1.5)
    assert emu_board.control("status")["boots"] == boots
    emu_board.control("hang")
    wait_for(lambda: emu_board.control("status")["boots"] > boots, timeout=5,
             what="the watchdog to reset the board")
    assert emu_board.control("status")["reset_cause"] == 3  # WDT_RESET
    mpremote(emu_board.link, "fs", "rm", ":main.py")


def test_nvs_lives_in_flash(emu_board):
    mpremote(emu_board.link, "exec",
             "import esp32\nn = esp32.NVS('citynode'); n.set_i32('boots', 7); n.commit()")
    emu_board.control("power", on=False)
    emu_board.control("power", on=True)
    out = wait_for(lambda: mpremote(emu_board.link, "exec",
                                    "import esp32\nprint(esp32.NVS('citynode').get_i32('boots'))",
                                    check=False), timeout=20, what="NVS after power cycle")
    assert out.strip() == "7"


def test_eight_boards_at_once(tmp_path):
    emu = start_emulator(tmp_path, count=8, timeout=60)
    try:
        assert len({b.mac for b in emu.boards}) == 8
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda b: mpremote(
                b.link, "exec", "import machine; print(machine.unique_id().hex())"), emu.boards))
        assert [o.strip() for o in outs] == [b.mac for b in emu.boards]
    finally:
        emu.stop()


def test_control_socket_in_a_deep_state_folder(tmp_path):
    """A state folder deeper than AF_UNIX's 107 bytes (a demo --workdir, pytest-xdist's
    temporary folders) still gets its control socket."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    emu = start_emulator(deep)
    try:
        assert len(str(emu.boards[0].state)) > 107
        assert emu.boards[0].control("status")["board"] == "esp32-devkitc"
    finally:
        emu.stop()

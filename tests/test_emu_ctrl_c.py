"""Ctrl-C lands anywhere in the emulated board's VM; the board must take it as the chip does.

The unix port raises KeyboardInterrupt from its SIGINT handler wherever the VM is
(MICROPY_ASYNC_KBD_INTR), not between bytecodes as the ESP32 port does: inside a
bus call's socket read (whose answer then comes late), inside a garbage
collection (which then never finishes, and leaves the heap locked), inside the
interning of a name (whose mutex then stays held: the next compile waits forever)
or in the REPL's own code as the program ends. Each test interrupts programs many
times through the raw REPL, as mpremote does, and checks that the board answers at
once and correctly every time.
"""

from __future__ import annotations

import random
import time

import pytest
import serial

SUPPLY_ADC = b"OK49648\r\n\x04\x04>"     # read_u16() of the devkitc's 5 V divider on GPIO 35
CHECK = b"import machine\nprint(machine.ADC(machine.Pin(35)).read_u16())\x04"
# Programs that never end: one waits on the bus most of the time, one collects garbage.
BUS_LOOP = (b"import machine\n"
            b"def work():\n"
            b"    adc = machine.ADC(machine.Pin(35))\n"
            b"    while True:\n"
            b"        adc.read_u16()\n"
            b"print('go')\n"
            b"work()\n")
GC_LOOP = (b"def work():\n"
           b"    junk = [None] * 200\n"
           b"    i = 0\n"
           b"    while True:\n"
           b"        junk[i % 200] = bytearray(100 + i % 300)\n"
           b"        i += 1\n"
           b"print('go')\n"
           b"work()\n")
# A name made at run time is a str of the heap, interned under the unix port's mutex
# at every getattr (a scan of the table each): most of this loop's time is spent
# holding it. New names for every trial: a str equal to a name already interned is
# made as that name, and getattr then looks nothing up.
NAMES_LOOP = (b"def work():\n"
              b"    names = ['t%d_' % TRIAL + str(i) for i in range(20)]\n"
              b"    i = 0\n"
              b"    while True:\n"
              b"        getattr(work, names[i % 20], None)\n"
              b"        i += 1\n"
              b"print('go')\n"
              b"work()\n")


class RawRepl:
    def __init__(self, link: str) -> None:
        self.port = serial.Serial(link, timeout=0.02)
        self.port.write(b"\r\x03\x03")
        time.sleep(0.3)
        self.port.read(100_000)
        self.port.write(b"\r\x01")
        assert self.read_until(b"raw REPL; CTRL-B to exit\r\n>").endswith(b">")

    def read_until(self, marker: bytes, timeout: float = 10) -> bytes:
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not buf.endswith(marker):
            buf += self.port.read(4096)
        return buf

    def interrupt(self, program: bytes, after_s: float) -> bytes:
        """Start `program`, Ctrl-C it `after_s` after it says it runs; what the board said
        until its prompt. (Not after OK: like the chip's pyexec, the board takes Ctrl-C as
        an interrupt only once the code runs, and a busy host may still be compiling.)"""
        self.port.write(program + b"\x04")
        assert self.read_until(b"go\r\n").endswith(b"OK" + b"go\r\n")
        time.sleep(after_s)
        self.port.write(b"\x03")
        return self.read_until(b"\x04>")

    def close(self) -> None:
        self.port.close()


@pytest.mark.parametrize("program", [BUS_LOOP, GC_LOOP, NAMES_LOOP],
                         ids=["in-a-bus-call", "in-the-gc", "in-a-name-lookup"])
def test_ctrl_c_anywhere_leaves_the_board_at_its_prompt(emu_board, tmp_path, program):
    repl = RawRepl(emu_board.link)
    boots = emu_board.control("status")["boots"]
    delays = random.Random(1)
    try:
        for trial in range(30):
            out = repl.interrupt(program.replace(b"TRIAL", b"%d" % trial),
                                 delays.uniform(0.02, 0.15))
            assert out.endswith(b"\x04>") and b"KeyboardInterrupt" in out, (trial, out[-600:])
            repl.port.write(CHECK)                     # the bus answers this call, not an old one
            out = repl.read_until(b"\x04>")
            assert out == SUPPLY_ADC, (trial, out[-600:])
    finally:
        repl.close()
    assert emu_board.control("status")["boots"] == boots, "the board rebooted"
    handed_over = (tmp_path / "emu.log").read_text().count("VM handed over")
    print(f"\n{handed_over} of 30 interrupts left the heap or the name table locked; "
          "a fresh VM carried on")


# Ends on its own a moment after it starts, raising: the Ctrl-C sent meanwhile lands in
# the program, in the REPL's handling of its error, or (too late) in the REPL's input.
ENDS_SOON = b"import time\ntime.sleep_ms(%d)\nraise ValueError('ended')\x04"


def test_ctrl_c_as_a_program_ends_leaves_the_board_at_its_prompt(emu_board):
    """The chip's pyexec drops a Ctrl-C pending when the program has ended in an error;
    the emulated board's REPL is Python, so the interrupt can land in it, which once ended
    the VM (exit 1, "Guru Meditation": about one program in a thousand)."""
    repl = RawRepl(emu_board.link)
    boots = emu_board.control("status")["boots"]
    timing = random.Random(2)
    try:
        for trial in range(200):
            repl.port.write(ENDS_SOON % timing.randrange(3))
            time.sleep(timing.uniform(0, 0.01))
            repl.port.write(b"\x03")
            out = repl.read_until(b"\x04>", timeout=5)
            assert out.startswith(b"OK\x04Traceback") and out.endswith(b"\x04>"), (trial, out)
            assert b"ValueError: ended" in out or b"KeyboardInterrupt" in out, (trial, out)
            repl.port.write(CHECK)
            out = repl.read_until(b"\x04>")
            assert out == SUPPLY_ADC, (trial, out[-600:])
    finally:
        repl.close()
    assert emu_board.control("status")["boots"] == boots, "the board rebooted"


def test_the_ctrl_c_that_interrupts_never_reaches_the_programs_input(emu_board):
    """The chip's UART IRQ takes the interrupt character out of the stream while code
    runs (ports/esp32/uart.c): a program that catches the KeyboardInterrupt and reads
    its input reads what came after the Ctrl-C, not the Ctrl-C."""
    repl = RawRepl(emu_board.link)
    try:
        repl.port.write(b"import sys, time\n"
                        b"try:\n"
                        b"    print('go')\n"
                        b"    time.sleep(10)\n"
                        b"except KeyboardInterrupt:\n"
                        b"    print(sys.stdin.buffer.read(1))\n\x04")
        assert repl.read_until(b"go\r\n").endswith(b"go\r\n")
        repl.port.write(b"\x03Z")
        assert repl.read_until(b"\x04>") == b"b'Z'\r\n\x04\x04>"
    finally:
        repl.close()

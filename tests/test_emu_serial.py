"""The emulated board's serial link, driven only by unmodified mpremote and pyserial."""

from __future__ import annotations

import time

import pytest
import serial

from citynode.testing.emulator import hard_reset, mpremote, wait_for


@pytest.mark.parametrize("via", ["pty", "rfc2217"])
def test_exec_prints_the_board_mac(shared_board, via):
    port = shared_board.link if via == "pty" else shared_board.url
    out = mpremote(port, "exec", "import machine; print(machine.unique_id().hex())")
    assert out.strip() == shared_board.mac


@pytest.mark.parametrize("via", ["pty", "rfc2217"])
def test_file_round_trip(shared_board, tmp_path, via):
    port = shared_board.link if via == "pty" else shared_board.url
    payload = bytes(range(256)) * 12 + b"\r\n\n\x03\x04 end"
    src = tmp_path / "blob.bin"
    src.write_bytes(payload)
    mpremote(port, "fs", "cp", str(src), ":blob.bin")
    listing = mpremote(port, "fs", "ls")
    assert f"{len(payload)} blob.bin" in " ".join(listing.split())
    back = tmp_path / "back.bin"
    mpremote(port, "fs", "cp", ":blob.bin", str(back))
    assert back.read_bytes() == payload
    assert (shared_board.state / "fs" / "blob.bin").read_bytes() == payload
    assert "hello" in mpremote(port, "exec", "open('t.txt','w').write('hello')",
                               "+", "fs", "cat", "t.txt")
    mpremote(port, "fs", "rm", ":blob.bin", "+", "fs", "rm", ":t.txt")
    assert "blob.bin" not in mpremote(port, "fs", "ls")


def test_exception_in_raw_repl_is_reported(shared_board):
    out = mpremote(shared_board.link, "exec", "1/0", check=False)
    assert "ZeroDivisionError" in out


def test_soft_reset_clears_the_heap_and_keeps_files(shared_board):
    mpremote(shared_board.link, "exec", "import builtins; builtins.marker = 42",
             "+", "exec", "open('keep.txt','w').write('x')")
    out = mpremote(shared_board.link, "soft-reset", "+", "exec",
                   "import builtins, os; "
                   "print(hasattr(builtins, 'marker'), 'keep.txt' in os.listdir())")
    assert out.split()[-2:] == ["False", "True"]
    mpremote(shared_board.link, "fs", "rm", ":keep.txt")


def test_main_py_runs_at_boot_and_ctrl_c_interrupts_it(emu_board):
    main = "import time\nopen('ran.txt','w').write('yes')\nwhile True:\n    time.sleep_ms(10)\n"
    mpremote(emu_board.link, "exec", f"open('main.py','w').write({main!r})")
    # a soft reset in the friendly REPL runs main.py, which never returns ...
    with serial.Serial(emu_board.link, timeout=0.2) as port:
        port.write(b"\x04")
        wait_for(lambda: (emu_board.state / "fs" / "ran.txt").exists(), what="main.py to run")
        assert emu_board.control("status")["running_code"]   # so a Ctrl-C interrupts
        # ... until Ctrl-C, after which the friendly REPL prompt comes back
        port.write(b"\x03")
        seen = b""
        deadline = time.monotonic() + 10
        while b">>> " not in seen and time.monotonic() < deadline:
            seen += port.read(256)
        assert b"KeyboardInterrupt" in seen
        assert b">>> " in seen
        assert not emu_board.control("status")["running_code"]
    # mpremote interrupts the same loop on its own when it connects
    mpremote(emu_board.link, "soft-reset")
    assert "ran" in mpremote(emu_board.link, "exec", "import os; print(os.listdir())")


def test_friendly_repl_evaluates_expressions(shared_board):
    with serial.Serial(shared_board.link, timeout=0.2) as port:
        port.write(b"\x03\x02")  # interrupt, then show the banner
        time.sleep(0.3)
        port.reset_input_buffer()
        port.write(b"6*7\r")
        seen = b""
        deadline = time.monotonic() + 5
        while b"42\r\n>>> " not in seen and time.monotonic() < deadline:
            seen += port.read(64)
        assert b"42\r\n>>> " in seen


def test_ctrl_c_at_the_friendly_prompt_cancels_the_statement(shared_board):
    """As the port's readline and pyexec do: Ctrl-C cancels the line being typed, or the
    whole compound statement from its continuation lines, with a new line and a prompt
    (no KeyboardInterrupt: nothing ran)."""
    with serial.Serial(shared_board.link, timeout=0.2) as port:
        port.write(b"\x03\x02")  # interrupt, then show the banner
        time.sleep(0.3)
        port.reset_input_buffer()
        port.write(b"print('line')\x03")
        port.write(b"for i in range(2):\r    print('statement')\r\x03")
        port.write(b"print('after')\r")
        seen = b""
        deadline = time.monotonic() + 5
        while b"after\r\n>>> " not in seen and time.monotonic() < deadline:
            seen += port.read(64)
    assert seen.endswith(b"after\r\n>>> "), seen
    assert b"print('line')\r\n>>> for i in range(2):" in seen, seen
    assert b"\r\n>>> print('after')" in seen, seen                 # the statement cancelled
    assert b"\r\nline\r\n" not in seen and b"\r\nstatement\r\n" not in seen, seen  # nothing ran
    assert b"KeyboardInterrupt" not in seen, seen


def test_hard_reset_reboots_with_the_matching_cause(emu_board):
    mpremote(emu_board.link, "exec", "import builtins; builtins.marker = 1")
    hard_reset(emu_board)
    out = wait_for(lambda: mpremote(emu_board.link, "resume", "exec",  # no soft reset first
                                    "import machine, builtins; print(machine.reset_cause(), "
                                    "hasattr(builtins, 'marker'))", check=False),
                   timeout=20, what="the board to come back")
    assert out.split()[-2:] == ["2", "False"]  # HARD_RESET: esp_restart() is ESP_RST_SW


def test_timer_callbacks_run_periodically_and_stop_on_deinit(shared_board):
    out = mpremote(shared_board.link, "exec",
                   "import machine, time\nticks = []\n"
                   "t = machine.Timer(0)\n"
                   "t.init(mode=machine.Timer.PERIODIC, period=50, callback=lambda _: "
                   "ticks.append(1))\n"
                   "time.sleep_ms(530)\nt.deinit()\nn = len(ticks)\ntime.sleep_ms(200)\n"
                   "once = []\n"
                   "machine.Timer(1).init(mode=machine.Timer.ONE_SHOT, period=20, "
                   "callback=lambda _: once.append(1))\n"
                   "time.sleep_ms(150)\nprint(n, len(ticks), len(once))")
    n, after, once = map(int, out.split())
    assert 8 <= n <= 11 and after == n and once == 1

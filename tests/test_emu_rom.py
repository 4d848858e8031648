"""ROM download mode of the emulated board, driven only by unmodified esptool (its CLI,
as a technician types it, and its Python API, as provisioning uses it)."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
import serial
from esptool.cmds import detect_chip, erase_flash, read_flash, reset_chip, run_stub, verify_flash
from esptool.util import FatalError

from citynode.testing.emulator import VENV_BIN, esptool, mpremote, start_emulator, wait_for


def _read_serial(link: str, seconds: float) -> bytes:
    with serial.Serial(link, timeout=0.1) as port:
        deadline, seen = time.monotonic() + seconds, b""
        while time.monotonic() < deadline:
            seen += port.read(512)
        return seen


def test_image_is_a_valid_esp_image(tmp_path):
    image = tmp_path / "mp.bin"
    subprocess.run([str(VENV_BIN / "citynode-emu"), "image", "--board", "esp32-devkitc",
                    "-o", str(image)], check=True, capture_output=True)
    out = subprocess.run([str(VENV_BIN / "esptool"), "image-info", str(image)],
                         capture_output=True, text=True, check=True).stdout
    assert "Checksum" in out and "(valid)" in out
    assert "ESP32" in out


def test_flash_verify_erase_cycle(tmp_path):
    emu = start_emulator(tmp_path)
    board = emu.boards[0]
    try:
        # read-mac over RFC 2217 prints the same MAC that MicroPython reports
        out = esptool(board.url, "read-mac")
        macs = re.findall(r"MAC:\s+([0-9a-f:]{17})", out)
        assert macs and macs[-1].replace(":", "") == board.mac
        assert mpremote(board.link, "exec",
                        "import machine; print(machine.unique_id().hex())").strip() == board.mac

        # a file on the filesystem survives flashing the firmware, as on a board
        mpremote(board.link, "exec", "open('keep.txt','w').write('k')")
        image = tmp_path / "mp.bin"
        subprocess.run([str(VENV_BIN / "citynode-emu"), "image", "--board", "esp32-devkitc",
                        "-o", str(image)], check=True, capture_output=True)
        assert "Hash of data verified" in esptool(board.url, "write-flash", "0x1000", str(image))
        assert "keep.txt" in wait_for(
            lambda: mpremote(board.link, "exec", "import os; print(os.listdir())", check=False),
            timeout=20, what="MicroPython after flashing")

        # verify, read back, a wrong image, erase: one session through esptool's Python
        # API (each CLI run pays ~10 s of pyserial RFC 2217 option handshakes and stub upload)
        other = image.read_bytes()[:-64] + bytes(64)
        esp = run_stub(detect_chip(board.url, connect_attempts=3))
        verify_flash(esp, [(0x1000, image.read_bytes())])
        assert read_flash(esp, 0x1000, 0x1000) == image.read_bytes()[:0x1000]
        with pytest.raises(FatalError, match="Verification failed"):
            verify_flash(esp, [(0x1000, other)])
        erase_flash(esp)
        reset_chip(esp, "hard-reset")
        esp._port.close()

        # erased: the ROM's boot error loop, no MicroPython, no files
        seen = _read_serial(board.link, 2.5)
        assert b"invalid header: 0xffffffff" in seen
        assert b"MicroPython" not in seen
        assert board.control("status")["mode"] == "error-loop"
        assert not any((board.state / "fs").iterdir())
    finally:
        emu.stop()


def test_blank_board_stays_in_the_rom_error_loop(tmp_path):
    emu = start_emulator(tmp_path, blank=True)
    try:
        seen = _read_serial(emu.boards[0].link, 2.5)
        assert b"rst:0x10 (RTCWDT_RTC_RESET)" in seen
        assert b">>>" not in seen
        out = mpremote(emu.boards[0].link, "exec", "print(1)", check=False, timeout=30)
        assert "1" not in out.split()
    finally:
        emu.stop()


def test_state_survives_a_restart_of_the_emulator(tmp_path):
    emu = start_emulator(tmp_path)
    mac = emu.boards[0].mac
    mpremote(emu.boards[0].link, "exec", "open('persist.txt','w').write('p')")
    emu.stop()
    emu = start_emulator(tmp_path)
    try:
        assert emu.boards[0].mac == mac
        assert "p" in mpremote(emu.boards[0].link, "fs", "cat", "persist.txt")
    finally:
        emu.stop()

"""The chip's mask ROM: boot messages, the blank-flash error loop, and the UART
download mode, which esp32-mock-bootloader serves with this board's flash and MAC.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from esp32_mock_bootloader import registers, server

from .flash import BoardFlash

_ROM_BANNER = {
    "esp32": "ets Jul 29 2019 12:21:46\r\n\r\n",
    "esp32s3": "ESP-ROM:esp32s3-20210327\r\nBuild:Mar 27 2021\r\n",
    "esp32c3": "ESP-ROM:esp32c3-api1-20210207\r\nBuild:Feb  7 2021\r\n",
}
# The ROM's reset reason codes (esp_rom rtc.h) and the names each ROM prints for them
POWERON, DEEPSLEEP, SW_CPU_RESET, BROWN_OUT, RTCWDT_RTC_RESET = 0x1, 0x5, 0xC, 0xF, 0x10
_RESET_NAMES = {
    "esp32": {POWERON: "POWERON_RESET", DEEPSLEEP: "DEEPSLEEP_RESET",
              SW_CPU_RESET: "SW_CPU_RESET", BROWN_OUT: "RTCWDT_BROWN_OUT_RESET",
              RTCWDT_RTC_RESET: "RTCWDT_RTC_RESET"},
    "later": {POWERON: "POWERON", DEEPSLEEP: "DSLEEP", SW_CPU_RESET: "RTC_SW_CPU_RST",
              BROWN_OUT: "BROWN_OUT_RST", RTCWDT_RTC_RESET: "RTCWDT_RTC_RST"},
}


def reset_name(chip: str, rst: int) -> str:
    """The name the chip's ROM prints for reset reason `rst` (ESP32, or the later chips)."""
    return _RESET_NAMES["esp32" if chip == "esp32" else "later"].get(rst, "UNKNOWN")


def boot_banner(chip: str, rst: int, download: bool) -> str:
    boot = "boot:0x3 (DOWNLOAD_BOOT(UART0/UART1/SDIO_REI_REO_V2))" if download else \
        "boot:0x13 (SPI_FAST_FLASH_BOOT)"
    text = _ROM_BANNER.get(chip, _ROM_BANNER["esp32"])
    text += f"rst:{rst:#x} ({reset_name(chip, rst)}),{boot}\r\n"
    if download:
        text += "waiting for download\r\n"
    return text


SECOND_STAGE_LOG = (
    "configsip: 0, SPIWP:0xee\r\nclk_drv:0x00,q_drv:0x00,d_drv:0x00,cs0_drv:0x00,"
    "hd_drv:0x00,wp_drv:0x00\r\nmode:DIO, clock div:2\r\n"
    "load:0x3fff0030,len:4728\r\nho 0 tail 12 room 4\r\nentry 0x400805b8\r\n")


# esp32-mock-bootloader gives every chip one fixed MAC; a board of ours has its
# own. Its per-connection ChipSession is seeded with this board's eFuse words.
_board_mac = threading.local()


class _BoardChipSession(server.ChipSession):
    def __init__(self, chip_mode: str) -> None:
        super().__init__(chip_mode)
        mac = getattr(_board_mac, "value", None)
        if mac is not None and chip_mode != "auto":
            self.registers.update(registers._mac_registers(chip_mode, tuple(mac)))


server.ChipSession = _BoardChipSession


RECV_WAIT_S = 0.5


class _UartConnection:
    """The duck-typed connection esp32-mock-bootloader reads and writes."""

    def __init__(self, rx: queue.Queue[bytes], tx: Callable[[bytes], None]):
        self._rx = rx
        self._tx = tx
        self._timeout = 0.05

    def set_timeout(self, timeout: float) -> None:
        self._timeout = timeout

    def recv(self, size: int) -> bytes:
        # The mock's 50 ms suits a socket; over RFC 2217 a host's reply (e.g. the acks
        # of a streamed read-flash) takes a few hundred ms, so wait at least RECV_WAIT_S.
        try:
            return self._rx.get(timeout=max(self._timeout, RECV_WAIT_S))
        except queue.Empty:
            raise TimeoutError() from None

    def sendall(self, data: bytes) -> None:
        self._tx(data)

    def close(self) -> None:
        pass

    def ignore_eof_for_disconnect(self) -> bool:
        return False

    def abort_empty_session(self) -> bool:
        return False


class DownloadMode:
    """Serves the ROM protocol until stop() (the next reset)."""

    def __init__(self, chip: str, mac: bytes, flash: BoardFlash, tx: Callable[[bytes], None]):
        self.rx: queue.Queue[bytes] = queue.Queue()
        self._stop = threading.Event()
        self._chip, self._mac, self._flash, self._tx = chip, mac, flash, tx
        self._thread = threading.Thread(target=self._run, name="rom-download", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        _board_mac.value = self._mac
        conn = _UartConnection(self.rx, self._tx)
        while not self._stop.is_set():
            server.handle_client(conn, self._stop, self._chip, flash=self._flash)
            self._flash.data.flush()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._flash.data.flush()


class BootErrorLoop:
    """Blank or erased flash: the ROM finds no bootloader and the RTC watchdog
    resets it, over and over; it never reaches MicroPython."""

    def __init__(self, chip: str, offset: int, tx: Callable[[bytes], None]):
        self._stop = threading.Event()
        self._chip, self._offset, self._tx = chip, offset, tx
        threading.Thread(target=self._run, name="rom-error-loop", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for _ in range(8):
                self._tx(b"invalid header: 0xffffffff\r\n")
                if self._stop.wait(0.25):
                    return
            self._tx(boot_banner(self._chip, RTCWDT_RTC_RESET, False).encode())

    def stop(self) -> None:
        self._stop.set()



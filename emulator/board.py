"""One emulated ESP32 board: the chip's life cycle around the real MicroPython VM.

Power, the EN/IO0 reset logic, the ROM (download mode or boot), the VM, the
watchdog and the radio meet here; the buses and the parts on them live in
peripherals.py. Everything a board remembers across restarts of citynode-emu
(MAC, flash, filesystem, NVS) lives under its state directory.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import threading
import time
from pathlib import Path

from citynode.boards import Board

from . import bus, rom
from .autoreset import AutoReset
from .flash import ROMFS_BLOCK, BoardStorage, atomic_write_json
from .radio import Radio
from .serial_link import PtyLink, Rfc2217Link, Uart
from .vm import EXIT_SOFT, EXIT_SOFT_RAW, VM, gc_ns_per_byte, resume_boot

log = logging.getLogger(__name__)

# machine.reset_cause() values of the ESP32 port (modmachine.c mp_machine_reset_cause):
# what esp_reset_reason() says about the last hard boot, unless a soft reset happened
# since (is_soft_reset: set by machine_deinit, cleared only by machine_init at a boot).
PWRON_RESET, HARD_RESET, WDT_RESET, DEEPSLEEP_RESET, SOFT_RESET = 1, 2, 3, 4, 5
# The ROM's rst: code for each hard boot: power-on and EN are POWERON; esp_restart()
# (machine.reset, a panic, the task watchdog's panic) is a software CPU reset, which
# ESP-IDF's reset-reason hint turns into ESP_RST_SW / PANIC (HARD) or TASK_WDT (WDT).
_ROM_RST = {PWRON_RESET: rom.POWERON, HARD_RESET: rom.SW_CPU_RESET,
            WDT_RESET: rom.SW_CPU_RESET, DEEPSLEEP_RESET: rom.DEEPSLEEP}
_EPOCH_2000 = 946684800


def _new_mac() -> str:
    # Espressif OUI, random NIC part; kept in the board's state from then on
    return "240ac4" + os.urandom(3).hex()


# How fast the board's crystal runs, in parts per million: its ticks, and so any clock the
# firmware keeps from them, drift by this much against the host's (true) time. ESP-IDF
# asks for a 40 MHz crystal within +-10 ppm (Wi-Fi needs it): the worst of it, fast.
XTAL_PPM = 10


class EmulatedBoard:
    def __init__(self, board: Board, state: Path, *, link: Path | None = None,
                 rfc2217_port: int | None = None, blank: bool = False,
                 peripherals=None, radio: Radio | None = None):
        self.board = board
        self.state = state
        state.mkdir(parents=True, exist_ok=True)
        self.identity = self._load_identity()
        self.mac = bytes.fromhex(self.identity["mac"])
        self.storage = BoardStorage(board, state)
        if self.identity.pop("new") and not blank:
            from .image import build_image  # a dev board ships with MicroPython flashed
            self.storage.flash.write(board.firmware_offset, build_image(board))
        self.peripherals = peripherals
        self.radio = radio or Radio()
        self.xtal_ppm = XTAL_PPM
        # the CPU clock: the image's until machine.freq(); a soft reset keeps it
        self.stock_mhz = board.speed.mhz if board.speed else 160
        self.cpu_mhz = self.stock_mhz
        self.bus = bus.BusServer(self._bus_call)
        self._lock = threading.RLock()
        self.mode = "off"
        self.boot_cause = PWRON_RESET   # esp_reset_reason() of the last hard boot
        self._soft_reset_since_boot = False
        self.boots = 0
        self._rom: rom.DownloadMode | rom.BootErrorLoop | None = None
        self._vm: VM | None = None
        self._rx_read, self._rx_write = os.pipe()
        os.set_blocking(self._rx_write, False)
        self._wdt_timeout: float | None = None
        self._wdt_fed = 0.0
        self._booted_at = time.monotonic()  # the chip's last reset (hard boot)
        self._hang = threading.Event()
        self._unhang = threading.Event()
        self._rtc_offset = _EPOCH_2000 - int(time.time())
        self._rtc_memory = b""
        self._nvs = self.storage.nvs_load()
        self.uart = Uart(self._receive, self._lines)
        self.autoreset = AutoReset(self.hold_in_reset, self._out_of_reset)
        self.pty = PtyLink(self.uart, link) if link else None
        self.rfc2217 = Rfc2217Link(self.uart, rfc2217_port) if rfc2217_port is not None else None
        threading.Thread(target=self._watchdog, name="wdt", daemon=True).start()

    # --- identity and state -----------------------------------------------------
    def _load_identity(self) -> dict:
        path = self.state / "board.json"
        if path.exists():
            identity = json.loads(path.read_text())
            if identity.get("board") != self.board.name:
                raise ValueError(
                    f"state dir {self.state} belongs to a {identity.get('board')} board, not "
                    f"{self.board.name}: use another --state or the matching --board")
            identity["new"] = False
            return identity
        identity = {"board": self.board.name, "mac": _new_mac()}
        atomic_write_json(path, identity)
        identity["new"] = True
        return identity

    @property
    def reset_cause(self) -> int:
        """What machine.reset_cause() returns now: SOFT_RESET from the first soft reset
        after a boot until the next hard one, else the boot's cause."""
        return SOFT_RESET if self._soft_reset_since_boot else self.boot_cause

    @property
    def mac_text(self) -> str:
        return ":".join(f"{b:02x}" for b in self.mac)

    # --- power and reset ----------------------------------------------------------
    def power_on(self) -> None:
        self._rtc_offset = _EPOCH_2000 - int(time.time())
        self._rtc_memory = b""
        self._boot(download=False, cause=PWRON_RESET)

    def power_cut(self) -> None:
        """Brown-out or pulled plug: everything stops where it is."""
        with self._lock:
            self._stop_cpu()
            self.mode = "off"

    def hold_in_reset(self) -> None:
        with self._lock:
            self._stop_cpu()
            self.mode = "reset"

    def _out_of_reset(self, download: bool) -> None:
        self._boot(download=download, cause=PWRON_RESET)

    def reset(self, cause: int, download: bool = False) -> None:
        self._boot(download=download, cause=cause)

    def _stop_cpu(self) -> None:
        if self._vm is not None:
            self._vm.kill()
            self._vm = None
        if self._rom is not None:
            self._rom.stop()
            if isinstance(self._rom, rom.DownloadMode):
                self.storage.drop_erased_filesystem()
            self._rom = None
        self._wdt_timeout = None
        self._unhang.set()
        self.radio.power_off()  # the Wi-Fi driver starts over (a soft reset keeps it)
        if self.peripherals is not None:
            self.peripherals.reset()
        self._drain_rx()

    def _drain_rx(self) -> None:
        os.set_blocking(self._rx_read, False)
        try:
            while os.read(self._rx_read, 65536):
                pass
        except BlockingIOError:
            pass
        os.set_blocking(self._rx_read, True)

    def _boot(self, download: bool, cause: int) -> None:
        with self._lock:
            self._stop_cpu()
            self._booted_at = time.monotonic()
            self.boot_cause = cause
            self._soft_reset_since_boot = False
            self.cpu_mhz = self.stock_mhz
            self._unhang.clear()
            self._send(rom.boot_banner(self.board.chip, _ROM_RST[cause], download))
            if download:
                self.mode = "download"
                self._rom = rom.DownloadMode(self.board.chip, self.mac, self.storage.flash,
                                             self.uart.transmit)
                return
            app = self.storage.app_info()
            if app is None:
                self.mode = "error-loop"
                self._rom = rom.BootErrorLoop(self.board.chip, self.board.firmware_offset,
                                              self.uart.transmit)
                return
            self._send(rom.SECOND_STAGE_LOG)
            if app.project != "micropython":
                self.mode = "other-firmware"
                self._send(f"I (31) boot: running '{app.project}' {app.version}\r\n")
                return
            self.app = app
            self.storage.mount_filesystem()
            self._start_vm("hard")

    def _start_vm(self, boot: str) -> None:
        self.mode = "running"
        if not boot.startswith("resume"):
            self.boots += 1
        env = {
            "CITYNODE_EMU_BUS": str(self.bus.port),
            "CITYNODE_EMU_FS": str(self.storage.fs_dir),
            "CITYNODE_EMU_BOOT": boot,
            # ticks_ms()/ticks_us() count from the chip's reset (board_side/emu_time.py)
            "CITYNODE_EMU_TICKS0_US": str(int(self._booted_at * 1_000_000)),
            "CITYNODE_EMU_XTAL_PPM": str(self.xtal_ppm),
            "CITYNODE_EMU_VERSION": f"{self.app.version} on {self.app.date}",
            "CITYNODE_EMU_MACHINE": f"{self.board.description} with {self.board.chip.upper()}",
        }
        # the ROMFS image is mapped flash on the chip; here the VM holds a copy
        if self.storage.romfs_partition():
            env["CITYNODE_EMU_ROMFS_PARTITION"] = "1"
        romfs = self.storage.romfs_image_size()
        if romfs:
            env["CITYNODE_EMU_ROMFS"] = str(romfs)
        extra_kb = romfs // 1024 + 1
        self._vm = VM(self.board.heap_kb, self._rx_read, env, self.uart.transmit,
                      self._vm_exited, self.state / "vm.log", extra_heap_kb=extra_kb,
                      speed_factor=self._chip_factor(), gc_kb_ms=self._chip_gc_rate())

    def _chip_factor(self) -> float | None:
        """The VM's slowdown at chip speed (issue 11): `speed_factor`, which is for the
        stock clock, at the clock the firmware set; None at host speed."""
        factor = getattr(self, "speed_factor", None)
        if factor is None or self.board.speed is None:
            return factor
        return max(1.0, factor / self.board.speed.at(self.cpu_mhz))

    def _chip_gc_rate(self) -> float | None:
        """The chip's rate of collecting its heap at the clock the firmware set (KB a ms,
        boards.yaml `speed:`); None without published figures."""
        speed = self.board.speed
        return speed.gc_kb_ms * speed.at(self.cpu_mhz) if speed is not None else None

    def _vm_exited(self, code: int) -> None:
        with self._lock:
            if self.mode != "running":
                return
            self._vm = None
            resume = resume_boot(code)
            if resume is not None:  # nothing happened to the chip: its watchdog runs on
                log.info("%s: VM handed over (a Ctrl-C left its heap or name table "
                         "locked); a fresh VM resumes", self.board.name)
                self._start_vm(resume)
                return
            # A soft reset leaves the task watchdog running (the ESP32 port has no WDT
            # deinit): only a hard reset, a power cut or the bite itself stops it.
            if code in (EXIT_SOFT, EXIT_SOFT_RAW, 0):
                self._soft_reset_since_boot = True
                self._start_vm("soft-raw" if code == EXIT_SOFT_RAW else "soft")
                return
        log.warning("%s: MicroPython VM died with exit code %s; rebooting", self.board.name, code)
        self._send(f"\r\nGuru Meditation Error: VM exited with {code}. Rebooting...\r\n")
        self.reset(HARD_RESET)

    # --- the UART ------------------------------------------------------------------
    def _send(self, text: str) -> None:
        self.uart.transmit(text.encode())

    def _receive(self, data: bytes) -> None:
        with self._lock:
            if self.mode == "download" and isinstance(self._rom, rom.DownloadMode):
                self._rom.rx.put(data)
            elif self.mode == "running" and self._vm is not None:
                if b"\x03" in data and self._vm.interrupt():
                    data = data.replace(b"\x03", b"")
                try:
                    os.write(self._rx_write, data)
                except BlockingIOError:
                    pass  # RX FIFO overflow: the chip drops bytes too

    def _lines(self, dtr: bool, rts: bool) -> None:
        self.autoreset.lines(dtr, rts)

    # --- the watchdog ----------------------------------------------------------------
    def _watchdog(self) -> None:
        """The task watchdog timer: it bites when its one user (machine.WDT) has not
        fed it within the timeout, across soft resets, until a hard reset stops it."""
        while True:
            time.sleep(0.05)
            timeout = self._wdt_timeout
            if timeout is not None and time.monotonic() - self._wdt_fed > timeout:
                log.warning("%s: watchdog expired; resetting", self.board.name)
                self._send(self._wdt_report())
                self.reset(WDT_RESET)

    @property
    def uptime_ms(self) -> int:
        """Milliseconds since the chip's last reset: its ticks_ms() now, before the 2**30
        wrap (the unix port's ticks and time.monotonic() are both CLOCK_MONOTONIC), by the
        board's crystal."""
        return int((time.monotonic() - self._booted_at) * (1000 + self.xtal_ppm / 1000))

    def _wdt_report(self) -> str:
        """What the ESP-IDF task watchdog prints before its panic restarts the chip."""
        ms = self.uptime_ms  # esp_log: ms since boot
        return (f"E ({ms}) task_wdt: Task watchdog got triggered. The following tasks/users "
                "did not reset the watchdog in time:\r\n"
                f"E ({ms}) task_wdt:  - mpy_machine_wdt\r\nRebooting...\r\n")

    def hang(self) -> None:
        """Fault injection: the next bus transaction never completes (a stuck part)."""
        self._unhang.clear()
        self._hang.set()

    # --- the bus: what the board-side modules ask of the silicon ---------------------
    def _bus_call(self, op: int, sub: int, payload: bytes) -> bytes:
        if op in _PERIPHERAL_OPS and self._hang.is_set():
            self._hang.clear()
            self._unhang.wait()
            raise OSError(errno.EIO, "reset while hung")
        handler = _HANDLERS.get(op)
        if handler is None:
            raise OSError(errno.ENOSYS, f"bus op {op}")
        return handler(self, sub, payload)

    def _op_hello(self, sub: int, payload: bytes) -> bytes:
        return json.dumps({"mac": self.mac.hex(), "board": self.board.name,
                           "chip": self.board.chip, "psram": self.board.psram_mb > 0,
                           "cpu_hz": self.cpu_mhz * 1_000_000,
                           "reset_cause": self.reset_cause,
                           "wake_reason": 0}).encode()

    def _op_state(self, sub: int, payload: bytes) -> bytes:
        """User code runs (1) or has ended (0: answered b"\\x01" if a Ctrl-C was sent
        into it), or Ctrl-C is off (2) or on (3)."""
        vm = self._vm
        if vm is None:
            return b""
        if sub in (0, 1):
            return b"\x01" if vm.set_interruptible(running=sub == 1) else b""
        vm.set_interruptible(kbd_intr=sub == 3)
        return b""

    def _op_reset(self, sub: int, payload: bytes) -> bytes:
        """machine.reset() and machine.bootloader() are esp_restart() (ESP_RST_SW, a
        HARD_RESET afterwards); deepsleep() wakes through the ROM's DEEPSLEEP_RESET."""
        if sub == 0:
            threading.Thread(target=self.reset, args=(HARD_RESET,), daemon=True).start()
        elif sub == 1:
            ms = struct.unpack("<I", payload)[0]
            threading.Thread(target=self._deepsleep, args=(ms,), daemon=True).start()
        else:
            threading.Thread(target=self.reset, args=(HARD_RESET, True), daemon=True).start()
        return b""

    def _deepsleep(self, ms: int) -> None:
        self.hold_in_reset()
        time.sleep(ms / 1000)
        self.reset(DEEPSLEEP_RESET)

    def _op_wdt_init(self, sub: int, payload: bytes) -> bytes:
        self._wdt_fed = time.monotonic()
        self._wdt_timeout = struct.unpack("<I", payload)[0] / 1000
        return b""

    def _op_wdt_feed(self, sub: int, payload: bytes) -> bytes:
        self._wdt_fed = time.monotonic()
        return b""

    def _op_wlan(self, sub: int, payload: bytes) -> bytes:
        radio = self.radio
        if sub == 0:
            if payload != b"?":
                radio.set_active(payload == b"\x01")
            return b"\x01" if radio.active else b"\x00"
        if sub == 1:
            n = payload[0]
            radio.connect(payload[1:1 + n].decode(), payload[1 + n:].decode())
            return b""
        if sub == 2:
            radio.disconnect()
            return b""
        if sub == 3:
            return struct.pack("<H", radio.status())
        if sub == 4:
            return struct.pack("<b", radio.signal_dbm())
        if sub == 5:
            up = radio.connected()
            return (b"192.168.4.23,255.255.255.0,192.168.4.1,192.168.4.1" if up
                    else b"0.0.0.0,0.0.0.0,0.0.0.0,0.0.0.0")
        if sub == 6:
            return f"{radio.ap_ssid or 'citynode'},{radio.rssi}\n".encode() if radio.ap_up else b""
        raise OSError(errno.EINVAL, "wlan op")

    def _op_resolve(self, sub: int, payload: bytes) -> bytes:
        port = struct.unpack_from("<H", payload)[0]
        return struct.pack("<H", self.radio.resolve(payload[2:].decode(), port))

    def _op_nvs(self, sub: int, payload: bytes) -> bytes:
        if sub == 4:
            return self._rtc_memory
        if sub == 5:
            self._rtc_memory = payload[:2048]
            return b""
        if sub == 6:
            return struct.pack("<q", self._rtc_offset)
        if sub == 7:
            self._rtc_offset = struct.unpack("<q", payload)[0]
            return b""
        if sub == 3:
            self.storage.nvs_store(self._nvs)
            return b""
        n = payload[0]
        key = payload[1:1 + n].decode()
        rest = payload[1 + n:]
        if sub == 0:
            entry = self._nvs.get(key)
            if entry is None or entry[0] != rest[0]:
                raise OSError(errno.ENOENT, "ESP_ERR_NVS_NOT_FOUND")
            return bytes.fromhex(entry[1])
        if sub == 1:
            self._nvs[key] = [rest[0], rest[1:].hex()]
            return b""
        if sub == 2:
            if self._nvs.pop(key, None) is None:
                raise OSError(errno.ENOENT, "ESP_ERR_NVS_NOT_FOUND")
            return b""
        raise OSError(errno.EINVAL, "nvs op")

    def _op_romfs(self, sub: int, payload: bytes) -> bytes:
        """The ROMFS partition as a block device (mpremote romfs deploy) and its image."""
        part = self.storage.romfs_partition()
        if part is None:
            raise OSError(errno.ENODEV, "no romfs partition")
        offset, size = part
        flash = self.storage.flash
        if sub == 0:
            return struct.pack("<III", size, ROMFS_BLOCK, self.storage.romfs_image_size())
        if sub == 1:
            at, n = struct.unpack("<II", payload)
            return flash.read(offset + at, min(n, size - at))
        if sub == 2:
            block = struct.unpack("<I", payload)[0]
            flash.erase_region(offset + block * ROMFS_BLOCK, ROMFS_BLOCK)
            return b""
        if sub == 3:
            at = struct.unpack_from("<I", payload)[0]
            data = payload[4:]
            if at + len(data) > size:
                raise OSError(errno.EFBIG, "write past the romfs partition")
            flash.write(offset + at, data)
            return b""
        raise OSError(errno.EINVAL, "romfs op")

    def _parts(self):
        if self.peripherals is None:
            raise OSError(errno.ENODEV, "no parts attached")
        return self.peripherals

    def _op_i2c_scan(self, sub: int, payload: bytes) -> bytes:
        return bytes(self._parts().i2c_scan(sub))

    def _op_i2c_write(self, sub: int, payload: bytes) -> bytes:
        return bytes((self._parts().i2c_write(sub, payload[0], payload[1:]) & 0xFF,))

    def _op_i2c_read(self, sub: int, payload: bytes) -> bytes:
        addr, n = struct.unpack("<BH", payload)
        return self._parts().i2c_read(sub, addr, n)

    def _op_uart_init(self, sub: int, payload: bytes) -> bytes:
        baud, rxbuf = struct.unpack("<IH", payload)
        self._parts().uart_init(sub, baud, rxbuf)
        return b""

    def _op_uart_write(self, sub: int, payload: bytes) -> bytes:
        self._parts().uart_write(sub, payload)
        return b""

    def _op_uart_read(self, sub: int, payload: bytes) -> bytes:
        n, timeout_ms = struct.unpack("<HH", payload)
        available, data = self._parts().uart_read(sub, n, timeout_ms)
        return struct.pack("<H", min(available, 0xFFFF)) + data

    def _op_i2s_init(self, sub: int, payload: bytes) -> bytes:
        mode, bits, fmt, rate, ibuf = struct.unpack("<BBBIi", payload)
        stream = self._parts().i2s_open(sub, mode, bits, fmt, rate, ibuf)
        return struct.pack("<HIq", stream.port, stream.ring_frames, stream.start_us)

    def _op_adc(self, sub: int, payload: bytes) -> bytes:
        return struct.pack("<H", self._parts().adc_read(payload[0]))

    def _op_pin(self, sub: int, payload: bytes) -> bytes:
        if sub == 1:
            self._parts().pin_write(payload[0], payload[1])
            return b""
        return bytes((self._parts().pin_read(payload[0]) & 1,))

    @property
    def running_code(self) -> bool:
        """True while boot.py, main.py or a REPL command runs: only then does a Ctrl-C
        interrupt (before, the port has not set its interrupt character, and the byte
        waits in the UART's buffer, as on the chip)."""
        vm = self._vm
        return vm is not None and vm.running_user_code

    def collections(self) -> dict[str, float] | None:
        """The running VM's heap collections at chip speed (VM.collections), else None."""
        vm = self._vm
        return vm.collections() if vm is not None else None

    def hitches(self) -> dict | None:
        """The running VM's host stalls at chip speed (VM.hitches), else None."""
        vm = self._vm
        return vm.hitches() if vm is not None else None

    def _op_cpu_freq(self, sub: int, payload: bytes) -> bytes:
        """machine.freq(hz), checked by the board side: at chip speed the VM runs faster
        or slower from its next burst."""
        self.cpu_mhz = struct.unpack("<I", payload)[0]
        vm = self._vm
        if vm is not None and vm.throttle is not None:
            vm.throttle.factor = self._chip_factor()
            if vm.throttle.gc_ns_per_byte:
                vm.throttle.gc_ns_per_byte = gc_ns_per_byte(self._chip_gc_rate())
        return b""

    def _op_pwm(self, sub: int, payload: bytes) -> bytes:
        pin, freq, duty = struct.unpack("<BIH", payload)
        self._parts().pwm(pin, freq, duty)
        return b""

    # --- shutdown ---------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._stop_cpu()
            self.mode = "off"
        for link in (self.pty, self.rfc2217):
            if link is not None:
                link.close()
        self.bus.close()
        self.radio.close()
        if self.peripherals is not None:
            self.peripherals.close()
        self.storage.close()


_HANDLERS = {
    bus.HELLO: EmulatedBoard._op_hello, bus.STATE: EmulatedBoard._op_state,
    bus.RESET: EmulatedBoard._op_reset, bus.WDT_INIT: EmulatedBoard._op_wdt_init,
    bus.WDT_FEED: EmulatedBoard._op_wdt_feed, bus.WLAN: EmulatedBoard._op_wlan,
    bus.RESOLVE: EmulatedBoard._op_resolve, bus.NVS: EmulatedBoard._op_nvs,
    bus.I2C_SCAN: EmulatedBoard._op_i2c_scan, bus.I2C_WRITE: EmulatedBoard._op_i2c_write,
    bus.I2C_READ: EmulatedBoard._op_i2c_read, bus.UART_INIT: EmulatedBoard._op_uart_init,
    bus.UART_WRITE: EmulatedBoard._op_uart_write, bus.UART_READ: EmulatedBoard._op_uart_read,
    bus.I2S_INIT: EmulatedBoard._op_i2s_init, bus.ADC: EmulatedBoard._op_adc,
    bus.PIN: EmulatedBoard._op_pin, bus.PWM: EmulatedBoard._op_pwm,
    bus.ROMFS: EmulatedBoard._op_romfs, bus.CPU_FREQ: EmulatedBoard._op_cpu_freq,
}
_PERIPHERAL_OPS = {bus.I2C_WRITE, bus.I2C_READ, bus.I2C_SCAN, bus.UART_READ, bus.UART_WRITE,
                   bus.ADC, bus.PIN}

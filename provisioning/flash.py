"""Flash MicroPython with esptool's Python API: right image, right chip, right offset, verified.

The image's own header says which chip it was built for, so an ESP32-S3 build is
refused for an ESP32 board before the board is touched; the chip esptool finds
must match boards.yaml too. esptool's console output is silenced (it is one
global logger, useless with parallel boards) and replaced by events per port.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import serial

from citynode.boards import Board, load_catalogue

from . import ports
from .errors import FlashError, UsageError
from .events import PortEvents

ROM_BAUD = 115200
_quiet = threading.Lock()
_quieted = False
_current = threading.local()  # the flashing thread's (events, image size)


def _silence_esptool() -> None:
    """Replace esptool's one global console logger by one that routes write progress to
    the events of the port being flashed in the calling thread, and drops the rest."""
    global _quieted
    with _quiet:
        if _quieted:
            return
        from esptool.logger import TemplateLogger, log

        class _EventLogger(TemplateLogger):
            def print(self, *args, **kwargs):
                pass

            def note(self, message):
                pass

            def warning(self, message):
                pass

            def error(self, message):
                pass

            def stage(self, finish=False):
                pass

            def set_verbosity(self, verbosity):
                pass

            def progress_bar(self, cur_iter, total_iters, prefix="", suffix="", bar_length=30):
                target = getattr(_current, "target", None)
                if target is not None and total_iters:
                    ev, size = target
                    ev.progress("flash", size * cur_iter // total_iters, size, "writing")

        log.set_logger(_EventLogger())
        _quieted = True


def image_chip(data: bytes) -> str | None:
    """The chip an ESP image header names (extended header chip id), or None if not an image."""
    if len(data) < 24 or data[0] != 0xE9:
        return None
    from esptool.targets import CHIP_DEFS

    chip_id = struct.unpack_from("<H", data, 12)[0]
    for name, cls in CHIP_DEFS.items():
        if getattr(cls, "IMAGE_CHIP_ID", None) == chip_id and name != "esp8266":
            return name
    return None


def boards_for_chip(chip: str) -> list[str]:
    return sorted(b.name for b in load_catalogue().values() if b.chip == chip)


def check_image(board: Board, data: bytes, source: str) -> None:
    chip = image_chip(data)
    if chip is None:
        raise FlashError(f"{source} is not an ESP firmware image (no 0xE9 header)",
                         f"use MicroPython's .bin release for {board.chip} "
                         f"({board.firmware_cache})")
    if chip != board.chip:
        fits = ", ".join(boards_for_chip(chip)) or "none of our boards"
        raise FlashError(
            f"{source} is built for {chip} (fits: {fits}), but {board.name} has an {board.chip}",
            f"use the {board.chip} image {board.firmware_cache} (boards.yaml firmware_cache) "
            f"or pass the --board the image is for")
    if len(data) + board.firmware_offset > board.flash_size:
        raise FlashError(f"{source} ({len(data)} bytes) does not fit {board.name}'s flash",
                         "use the image for this board")


def cache_dir() -> Path:
    return Path(os.environ.get("CITYNODE_FIRMWARE_CACHE",
                               Path.home() / ".cache" / "citynode" / "firmware"))


def find_image(board: Board, image: str | None, cache: str | None = None) -> Path:
    path = Path(image) if image else Path(cache or cache_dir()) / board.firmware_cache
    if not path.is_file():
        raise UsageError(f"no MicroPython image at {path}",
                         f"download {board.firmware_cache} from micropython.org/download/ into "
                         f"{path.parent} or pass --image FILE")
    return path


@dataclass(frozen=True)
class Image:
    path: Path
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def load_image(board: Board, image: str | None, cache: str | None = None) -> Image:
    path = find_image(board, image, cache)
    data = path.read_bytes()
    check_image(board, data, str(path))
    return Image(path, data)


@dataclass
class ChipInfo:
    chip: str
    mac: str
    flash_size: int | None

    def to_dict(self) -> dict:
        return {"chip": self.chip, "mac": self.mac, "flash_size": self.flash_size}


def _connect(port: str):
    from esptool.cmds import detect_chip
    from esptool.util import FatalError

    _silence_esptool()
    ports.check_port(port)
    try:
        return detect_chip(port, baud=ROM_BAUD, connect_attempts=3)
    except FatalError as exc:
        raise FlashError(f"the board on {port} did not enter ROM download mode ({exc})",
                         "hold BOOT, press and release EN, release BOOT, then re-run; "
                         "a charge-only USB cable also causes this") from None
    except (serial.SerialException, OSError) as exc:
        raise ports.open_error(port, exc) from None


def _chip_name(esp) -> str:
    return esp.CHIP_NAME.lower().replace("-", "")


def _close(esp) -> None:
    try:
        esp._port.close()
    except (OSError, serial.SerialException, AttributeError):
        pass


def chip_info(port: str) -> ChipInfo:
    """Chip, MAC and flash size through the ROM; resets the board back into its app."""
    from esptool.cmds import reset_chip

    esp = _connect(port)
    try:
        mac = "".join(f"{b:02x}" for b in esp.read_mac())
        size = None
        try:
            flash_id = esp.flash_id()
            size = 1 << ((flash_id >> 16) & 0xFF)
        except Exception:  # esptool raises FatalError/struct errors on odd flash chips
            pass
        info = ChipInfo(_chip_name(esp), mac, size)
        reset_chip(esp, "hard-reset")
        return info
    finally:
        _close(esp)


def flash(port: str, board: Board, image: Image, ev: PortEvents) -> ChipInfo:
    """Write the image at the board's offset, compressed, verified (MD5), then hard reset."""
    from esptool.cmds import reset_chip, run_stub, write_flash
    from esptool.util import FatalError

    ev.start("flash", f"{image.path.name} -> 0x{board.firmware_offset:x}, resetting into "
             "download mode")
    esp = _connect(port)
    try:
        chip = _chip_name(esp)
        if chip != board.chip:
            fits = ", ".join(boards_for_chip(chip)) or "no board in boards.yaml"
            raise FlashError(f"the board on {port} is an {chip}, not the {board.chip} of "
                             f"{board.name}", f"pass the right --board ({fits})")
        mac = "".join(f"{b:02x}" for b in esp.read_mac())
        ev.info("flash", f"{chip} {mac}, loading the flasher stub")
        try:
            esp = run_stub(esp)
            if board.baud != ROM_BAUD:
                esp.change_baud(board.baud)
            esp.flash_set_parameters(board.flash_size)
            ev.progress("flash", 0, len(image.data), "writing")
            _current.target = (ev, len(image.data))
            try:
                write_flash(esp, [(board.firmware_offset, image.data)], compress=True)
            finally:
                _current.target = None
        except FatalError as exc:
            raise FlashError(f"writing or verifying the flash of {port} failed ({exc})",
                             "re-run flash; if it fails again, check power and cable, then "
                             "try erase-flash with esptool") from None
        ev.progress("flash", len(image.data), len(image.data), "written and verified (MD5)")
        reset_chip(esp, "hard-reset")
    except (serial.SerialException, OSError) as exc:
        raise FlashError(f"lost the board on {port} while flashing ({exc})",
                         "check the cable, then re-run: flashing starts over safely") from None
    finally:
        _close(esp)
    ev.done("flash", f"{len(image.data)} bytes at 0x{board.firmware_offset:x}, verified",
            image_sha256=image.sha256)
    return ChipInfo(chip, mac, board.flash_size)

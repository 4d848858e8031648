"""A stand-in for the MicroPython release image, built with esptool's own image classes.

CI cannot download MicroPython's .bin, so `citynode-emu image` makes a merged
image laid out like the real one (second-stage bootloader, partition table,
factory app) with an `esp_app_desc_t` naming the project `micropython`. The
emulated ROM boots MicroPython only from flash that holds such an image, so
flashing, verifying and erasing are as meaningful as on a board.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from esptool.bin_image import ELFSection, LoadFirmwareImage
from esptool.bin_image import ESP32C3FirmwareImage as _ESP32C3Image
from esptool.bin_image import ESP32FirmwareImage as _ESP32Image
from esptool.bin_image import ESP32S3FirmwareImage as _ESP32S3Image
from esptool.targets import CHIP_DEFS

from citynode.boards import Board

MICROPYTHON_VERSION = "v1.28.0"
BUILD_DATE = "2026-04-06"
IDF_VERSION = "v5.4.2"

PARTITION_TABLE_OFFSET = 0x8000
NVS_OFFSET, NVS_SIZE = 0x9000, 0x6000
APP_OFFSET = 0x10000
VFS_OFFSET = 0x200000   # the filesystem: the rest of the flash
ROMFS_SUBTYPE = 0x8F

_APP_DESC_MAGIC = 0xABCD5432
_APP_DESC = struct.Struct("<II8s32s32s16s16s32s32sHHB3s72s")
_PART_MAGIC = b"\xaa\x50"
_PART_ENTRY = struct.Struct("<2sBBII16sI")

_IMAGE_CLASSES = {"esp32": _ESP32Image, "esp32s3": _ESP32S3Image, "esp32c3": _ESP32C3Image}


@dataclass(frozen=True)
class AppInfo:
    project: str
    version: str
    date: str


def _region(chip: str, name: str) -> int:
    for start, _end, kind in CHIP_DEFS[chip].MEMORY_MAP:
        if kind == name:
            return start
    raise KeyError(f"{chip} has no {name} region")


def _new_image(chip: str):
    try:
        image = _IMAGE_CLASSES[chip]()
    except KeyError:
        raise ValueError(f"no image builder for chip {chip}") from None
    image.chip_id = CHIP_DEFS[chip].IMAGE_CHIP_ID
    image.flash_mode = 2  # DIO
    image.flash_size_freq = 0x20  # 4 MB, 40 MHz
    return image


def _encode(image) -> bytes:
    return image.save(None)


def _segment(name: str, addr: int, data: bytes) -> ELFSection:
    return ELFSection(name.encode(), addr, data, flags=0)


def _bootloader(chip: str) -> bytes:
    image = _new_image(chip)
    desc = struct.pack("<B3sI32s24s16s", 0x50, b"", 1, IDF_VERSION.encode(),
                       f"{BUILD_DATE} 00:00:00".encode(), b"")
    iram = _region(chip, "IRAM")
    image.segments = [_segment(".dram0.data", _region(chip, "DRAM"), desc + b"\0" * 48),
                      _segment(".iram_loader.text", iram, _filler(b"bootloader", 4096))]
    image.entrypoint = iram
    return _encode(image)


def _app(chip: str) -> bytes:
    image = _new_image(chip)
    desc = _APP_DESC.pack(_APP_DESC_MAGIC, 0, b"", MICROPYTHON_VERSION.encode(),
                          b"micropython", b"00:00:00", BUILD_DATE.encode(),
                          IDF_VERSION.encode(), hashlib.sha256(b"micropython").digest(),
                          0, 0, 0, b"", b"")
    irom = _region(chip, "IROM") if chip != "esp32" else CHIP_DEFS[chip].IROM_MAP_START
    image.segments = [_segment(".flash.appdesc", _region(chip, "DROM") + 0x20,
                               desc + _filler(b"rodata", 2048)),
                      _segment(".flash.text", irom + 0x20, _filler(b"text", 8192))]
    image.entrypoint = irom + 0x20
    return _encode(image)


def _filler(seed: bytes, size: int) -> bytes:
    out = bytearray()
    block = seed
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def _partition_table(board: Board) -> bytes:
    """MicroPython's partitions-4MiBplus.csv (the stock images), or with the board's
    romfs_kb a ROMFS partition taken from the end of the app's, as
    partitions-4MiB-romfs.csv does."""
    flash = board.flash_size
    romfs = board.romfs_kb * 1024
    entries = [
        (b"nvs", 1, 0x02, NVS_OFFSET, NVS_SIZE),
        (b"phy_init", 1, 0x01, 0xF000, 0x1000),
        (b"factory", 0, 0x00, APP_OFFSET, VFS_OFFSET - APP_OFFSET - romfs),
    ]
    if romfs:
        entries.append((b"romfs", 1, ROMFS_SUBTYPE, VFS_OFFSET - romfs, romfs))
    entries.append((b"vfs", 1, 0x81, VFS_OFFSET, flash - VFS_OFFSET))
    table = b"".join(_PART_ENTRY.pack(_PART_MAGIC, kind, sub, off, size, label, 0)
                     for label, kind, sub, off, size in entries)
    table += b"\xeb\xeb" + b"\xff" * 14 + hashlib.md5(table).digest()
    return table + b"\xff" * (0xC00 - len(table))


def build_image(board: Board) -> bytes:
    """The merged image, to be written at board.firmware_offset."""
    base = board.firmware_offset
    out = bytearray(b"\xff" * (APP_OFFSET - base))
    boot = _bootloader(board.chip)
    out[0:len(boot)] = boot
    table = _partition_table(board)
    out[PARTITION_TABLE_OFFSET - base:PARTITION_TABLE_OFFSET - base + len(table)] = table
    return bytes(out) + _app(board.chip)


def read_partitions(flash: bytes) -> dict[str, tuple[int, int]]:
    """label -> (offset, size) from the table at 0x8000; empty if none is there."""
    parts = {}
    for i in range(PARTITION_TABLE_OFFSET, PARTITION_TABLE_OFFSET + 0xC00, _PART_ENTRY.size):
        magic, _kind, _sub, off, size, label, _flags = _PART_ENTRY.unpack_from(flash, i)
        if magic != _PART_MAGIC:
            break
        parts[label.rstrip(b"\0").decode(errors="replace")] = (off, size)
    return parts


def read_app_info(board: Board, flash: bytes) -> AppInfo | None:
    """What the ROM and second-stage bootloader would find; None when nothing bootable."""
    try:
        LoadFirmwareImage(board.chip, flash[board.firmware_offset:PARTITION_TABLE_OFFSET])
        factory = read_partitions(flash).get("factory")
        if factory is None:
            return None
        app = LoadFirmwareImage(board.chip, flash[factory[0]:factory[0] + factory[1]])
    except Exception:  # esptool raises FatalError and struct errors on garbage
        return None
    if not app.segments or len(app.segments[0].data) < _APP_DESC.size:
        return None
    fields = _APP_DESC.unpack_from(app.segments[0].data)
    if fields[0] != _APP_DESC_MAGIC:
        return None
    text = [f.rstrip(b"\0").decode(errors="replace") for f in (fields[4], fields[3], fields[6])]
    return AppInfo(project=text[0], version=text[1], date=text[2])

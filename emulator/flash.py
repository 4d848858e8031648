"""The board's SPI flash: one image file per board, written in place.

The ROM download mode (esp32-mock-bootloader) writes into it; the boot path reads
the firmware, the NVS partition and the filesystem marker from it. Because it is a
memory-mapped file, a power cut (SIGKILL) leaves it exactly as far as writes got.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from pathlib import Path

from esp32_mock_bootloader.server import FlashImage

from citynode.boards import Board

from .image import NVS_OFFSET, NVS_SIZE, VFS_OFFSET, AppInfo, read_app_info, read_partitions

ROMFS_MAGIC = b"\xd2\xcd\x31"
ROMFS_BLOCK = 4096

# littlefs keeps its magic at byte 8 of the superblock: where MicroPython finds
# none, it formats the filesystem. We keep the files in a folder and the
# superblock in flash, so an erased flash means an empty filesystem.
_LFS_MAGIC = b"littlefs"
# what MicroPython's ESP32 port writes into a freshly formatted filesystem
_DEFAULT_BOOT_PY = ("# This file is executed on every boot (including wake-boot from deepsleep)\n"
                    "#import esp\n#esp.osdebug(None)\n#import webrepl\n#webrepl.start()\n")


class BoardFlash(FlashImage):
    """esp32-mock-bootloader's flash store, backed by the board's image file."""

    def __init__(self, path: Path, size: int):
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.stat().st_size != size:
            with open(path, "wb") as f:
                f.write(b"\xff" * size)
        self._file = open(path, "r+b")
        self.data = mmap.mmap(self._file.fileno(), size)

    def snapshot(self) -> bytes:
        return bytes(self.data)

    def write(self, offset: int, blob: bytes) -> None:
        self.data[offset:offset + len(blob)] = blob

    def close(self) -> None:
        self.data.flush()
        self.data.close()
        self._file.close()


class BoardStorage:
    """Flash plus the filesystem folder that the vfs partition stands for."""

    def __init__(self, board: Board, state: Path):
        self.board = board
        self.flash = BoardFlash(state / "flash.bin", board.flash_size)
        self.fs_dir = state / "fs"
        self.fs_dir.mkdir(exist_ok=True)

    def app_info(self) -> AppInfo | None:
        return read_app_info(self.board, self.flash.snapshot())

    def _vfs_offset(self) -> int:
        return read_partitions(self.flash.read(0, VFS_OFFSET)).get("vfs", (VFS_OFFSET, 0))[0]

    def romfs_partition(self) -> tuple[int, int] | None:
        """(offset, size) of the ROMFS partition, if the partition table has one."""
        return read_partitions(self.flash.read(0, VFS_OFFSET)).get("romfs")

    def romfs_image_size(self) -> int:
        """Bytes of the ROMFS image in its partition (0: none, or not a valid image)."""
        part = self.romfs_partition()
        if part is None:
            return 0
        head = self.flash.read(part[0], 16)
        if not head.startswith(ROMFS_MAGIC):
            return 0
        size, shift_bytes = 0, head[3:]
        for value in shift_bytes:
            size = (size << 7) | (value & 0x7F)
            if not value & 0x80:
                break
        header = 3 + next(i for i, v in enumerate(shift_bytes) if not v & 0x80) + 1
        total = header + size
        return total if total <= part[1] else 0

    def _has_filesystem(self) -> bool:
        return self.flash.read(self._vfs_offset() + 8, len(_LFS_MAGIC)) == _LFS_MAGIC

    def drop_erased_filesystem(self) -> None:
        """After flash writes or an erase: files whose superblock is gone are gone."""
        if not self._has_filesystem():
            shutil.rmtree(self.fs_dir, ignore_errors=True)
            self.fs_dir.mkdir()

    def mount_filesystem(self) -> bool:
        """As MicroPython does at boot: format when no filesystem is found. True if formatted."""
        if self._has_filesystem():
            return False
        self.drop_erased_filesystem()
        (self.fs_dir / "boot.py").write_text(_DEFAULT_BOOT_PY)
        self.flash.write(self._vfs_offset(), b"\x00" * 8 + _LFS_MAGIC)
        return True

    # NVS: a small JSON blob at the start of the nvs partition (length-prefixed).
    def nvs_load(self) -> dict[str, list]:
        raw = self.flash.read(NVS_OFFSET, NVS_SIZE)
        size = int.from_bytes(raw[:4], "little")
        if size == 0xFFFFFFFF or size > NVS_SIZE - 4:
            return {}
        try:
            return json.loads(raw[4:4 + size])
        except ValueError:
            return {}

    def nvs_store(self, entries: dict[str, list]) -> None:
        blob = json.dumps(entries, separators=(",", ":")).encode()
        if len(blob) > NVS_SIZE - 4:
            raise OSError(28, "NVS partition full")
        self.flash.write(NVS_OFFSET, len(blob).to_bytes(4, "little") + blob)
        self.flash.data.flush()

    def close(self) -> None:
        self.flash.close()


def atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)

"""The emulated board's MicroPython image follows the catalogue: a ROMFS partition only
where boards.yaml says the board's image has one (the stock v1.24-v1.28 images have none)."""

from __future__ import annotations

from dataclasses import replace

from citynode.boards import get_board
from citynode.emulator.image import VFS_OFFSET, build_image, read_partitions


def _partitions(romfs_kb: int) -> dict[str, tuple[int, int]]:
    board = replace(get_board("esp32-devkitc"), romfs_kb=romfs_kb)
    image = build_image(board)
    flash = b"\xff" * board.firmware_offset + image
    return read_partitions(flash[:VFS_OFFSET])


def test_a_stock_image_has_no_romfs_partition_and_a_full_size_app():
    parts = _partitions(0)
    assert "romfs" not in parts
    assert parts["factory"] == (0x10000, 0x1F0000)          # partitions-4MiBplus.csv
    assert parts["vfs"][0] == VFS_OFFSET


def test_a_romfs_image_takes_its_partition_from_the_end_of_the_app():
    parts = _partitions(128)
    assert parts["romfs"] == (0x1E0000, 0x20000)              # partitions-4MiB-romfs.csv
    assert parts["factory"] == (0x10000, 0x1D0000)

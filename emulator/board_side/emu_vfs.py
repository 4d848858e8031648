# `vfs` for the emulated board, with the ESP32 port's ROMFS partition: the
# bytecode image lives in the flash image on the host. mpremote's
# `romfs deploy` writes it through rom_ioctl (the block-device form). An image
# without a ROMFS partition is built without ROMFS support (every stock
# ESP32_GENERIC image of v1.24-v1.28): there vfs has no rom_ioctl at all.
from vfs import *  # noqa
import os
import struct
import emu_link as _link

_INFO, _READ, _ERASE, _WRITE = 0, 1, 2, 3


def _info():
    return struct.unpack("<III", _link.call(_link.ROMFS, _INFO))


class _Partition:
    """The partition as mpremote drives it: ioctl(4) blocks, ioctl(5) block size,
    ioctl(6, n) erase block n, writeblocks(n, buf, offset)."""

    def __init__(self):
        self.size, self.block, _ = _info()

    def ioctl(self, op, arg):
        if op == 4:
            return self.size // self.block
        if op == 5:
            return self.block
        if op == 6:
            _link.call(_link.ROMFS, _ERASE, struct.pack("<I", arg))
            return 0
        return 0

    def writeblocks(self, block, buf, offset=0):
        at = block * self.block + offset
        mv = memoryview(buf)
        for i in range(0, len(buf), 1024):
            _link.call(_link.ROMFS, _WRITE, struct.pack("<I", at + i) + bytes(mv[i:i + 1024]))


def _rom_ioctl(op, rom_id=0, *args):
    try:
        _info()
    except OSError:
        return -19  # no ROMFS partition on this flash
    if op == 1:
        return 1
    if rom_id != 0:
        return -19
    if op == 2:
        return _Partition()
    return -22


if os.getenv("CITYNODE_EMU_ROMFS_PARTITION"):
    rom_ioctl = _rom_ioctl


def load_image():
    """The ROMFS image from flash as a memoryview (None when the partition is empty)."""
    try:
        size, _, used = _info()
    except OSError:
        return None
    if not used:
        return None
    # Collected before and after: on the chip the image is flash, so the reads' garbage
    # must not leave the image, or what is made next, in the middle of the heap.
    import gc
    gc.collect()
    img = bytearray(used)
    for at in range(0, used, 1024):
        n = min(1024, used - at)
        img[at:at + n] = _link.call(_link.ROMFS, _READ, struct.pack("<II", at, n))
    gc.collect()
    return memoryview(img)

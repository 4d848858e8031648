# `micropython` for the emulated board: the real module, except kbd_intr, which
# on the unix port would hand SIGINT back to the kernel and kill the VM.
from micropython import *  # noqa
import emu_link as _link


def kbd_intr(ch):
    _link.call(_link.STATE, 2 if ch == -1 else 3)

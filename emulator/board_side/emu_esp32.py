# `esp32` for the emulated board: NVS lives in the board's flash image (the
# nvs partition), so erasing the flash erases it, as on the chip.
import struct
import emu_link as _link

_GET, _SET, _ERASE, _COMMIT = 0, 1, 2, 3
_I32, _BLOB = 0, 1


class NVS:
    def __init__(self, namespace):
        if not namespace or len(namespace) > 15:
            raise ValueError("namespace must be 1-15 characters")
        self._ns = namespace

    def _key(self, key):
        k = (self._ns + "\x00" + key).encode()
        return bytes((len(k),)) + k

    def set_i32(self, key, value):
        _link.call(_link.NVS, _SET, self._key(key) + bytes((_I32,)) + struct.pack("<i", value))

    def get_i32(self, key):
        data = _link.call(_link.NVS, _GET, self._key(key) + bytes((_I32,)))
        return struct.unpack("<i", data)[0]

    def set_blob(self, key, value):
        _link.call(_link.NVS, _SET, self._key(key) + bytes((_BLOB,)) + bytes(value))

    def get_blob(self, key, buf):
        data = _link.call(_link.NVS, _GET, self._key(key) + bytes((_BLOB,)))
        buf[:len(data)] = data
        return len(data)

    def erase_key(self, key):
        _link.call(_link.NVS, _ERASE, self._key(key))

    def commit(self):
        _link.call(_link.NVS, _COMMIT)


def raw_temperature():
    return 120


def mcu_temperature():
    return 48

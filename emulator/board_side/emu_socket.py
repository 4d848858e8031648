# `socket` for the emulated board: the real unix-port sockets, but names are
# resolved through the emulated radio, so traffic flows only while the Wi-Fi
# link is up and dies when it drops.
import struct
import emu_link as _link
from socket import *  # noqa: the unix port's real sockets
import socket as _real


def getaddrinfo(host, port, af=0, type=0, proto=0, flags=0):
    h = host.encode() if isinstance(host, str) else bytes(host)
    try:
        data = _link.call(_link.RESOLVE, 0, struct.pack("<H", port) + h)
    except OSError:
        raise OSError(-202)  # EAI_FAIL, what lwIP reports when the link is down
    proxy = struct.unpack("<H", data)[0]
    return _real.getaddrinfo("127.0.0.1", proxy, af, type, proto, flags)

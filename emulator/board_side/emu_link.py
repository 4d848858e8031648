# The board's wires to the emulator host: one request/response socket that
# stands in for the silicon (buses, radio, watchdog, reset logic).
# Frame: request  <B op><B sub><H len> payload
#        response <b status><H len> data   (status < 0: -errno)
import socket
import struct
import os

try:  # the chip's drivers timed as the chip's C (emu_drivers), where the VM has viper
    from emu_drivers import begin as driver_begin, end as driver_end
except Exception:
    def driver_begin():
        pass

    def driver_end(ns):
        pass

HELLO = 1
STATE = 2
RESET = 3
WDT_INIT = 4
WDT_FEED = 5
PIN = 6
PWM = 7
ADC = 8
I2C_WRITE = 10
I2C_READ = 11
I2C_SCAN = 12
UART_INIT = 13
UART_WRITE = 14
UART_READ = 15
I2S_INIT = 17
WLAN = 20
RESOLVE = 21
NVS = 22
ROMFS = 23
CPU_FREQ = 24

_sock = None
_hdr = bytearray(3)
# True from a request's first byte to its response's last. Ctrl-C can stop call()
# anywhere in between (the unix port raises KeyboardInterrupt from its signal
# handler, even inside a socket read), and the answer it was waiting for would then
# be read as the next call's: so the next call starts on a fresh connection.
_busy = False


def connect():
    global _sock
    if _sock is not None:
        old, _sock = _sock, None
        old.close()  # the host drops what it still had to say on it
    port = int(os.getenv("CITYNODE_EMU_BUS"))
    s = socket.socket()
    s.setsockopt(1, 12, 6)  # SO_PRIORITY 6: the chip's own wire (emulator/chipclock.c)
    s.connect(socket.getaddrinfo("127.0.0.1", port)[0][-1])
    _sock = s


def _read_exact(n):
    buf = bytearray(n)
    mv = memoryview(buf)
    got = 0
    while got < n:
        k = _sock.readinto(mv[got:])
        if not k:
            raise OSError(5)  # EIO: the host went away (power cut)
        got += k
    return buf


CALL_NS = 20000     # the chip's C for one bus call (the IDF driver's), beside its wire time


def call(op, sub=0, payload=b""):
    driver_begin()
    try:
        return _call(op, sub, payload)
    finally:
        driver_end(CALL_NS)


def _call(op, sub, payload):
    global _busy
    if _busy or _sock is None:
        connect()
    _busy = True
    # one write per request: two small writes would wait out TCP's delayed ACK (~40 ms)
    _sock.write(struct.pack("<BBH", op, sub, len(payload)) + payload)
    got = 0
    mv = memoryview(_hdr)
    while got < 3:
        k = _sock.readinto(mv[got:])
        if not k:
            raise OSError(5)
        got += k
    status, n = struct.unpack("<bH", _hdr)
    data = _read_exact(n) if n else b""
    _busy = False
    if status < 0:
        raise OSError(-status)
    return data

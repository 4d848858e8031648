# `machine` for the emulated ESP32. Every peripheral is a thin front for the
# emulator host, which holds the simulated parts at bus level.
import io as _io
import struct
import time as _t
import emu_link as _link

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5

_info = None
_STREAM_POLL = 3        # py/stream.h ioctl requests
_STREAM_GET_FILENO = 10


def _board():
    global _info
    if _info is None:
        import json
        _info = json.loads(_link.call(_link.HELLO))
    return _info


def unique_id():
    return bytes.fromhex(_board()["mac"])


def reset_cause():
    return _board()["reset_cause"]


def wake_reason():
    return _board().get("wake_reason", 0)


def reset():
    _link.call(_link.RESET, 0)
    while True:  # the host pulls the plug on this VM
        _t.sleep_ms(1000)


def soft_reset():
    raise SystemExit(0)


def deepsleep(ms=0):
    _link.call(_link.RESET, 1, struct.pack("<I", ms))
    while True:
        _t.sleep_ms(1000)


lightsleep = None


def bootloader():
    _link.call(_link.RESET, 2)
    while True:
        _t.sleep_ms(1000)


_freq = 160000000


def freq(hz=None):
    global _freq
    if hz is None:
        return _freq
    if hz not in (20000000, 40000000, 80000000, 160000000, 240000000):
        raise ValueError("frequency must be 20MHz, 40MHz, 80Mhz, 160MHz or 240MHz")
    _freq = hz


def idle():
    _t.sleep_ms(1)


def disable_irq():
    return 0


def enable_irq(state=0):
    pass


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 2
    PULL_DOWN = 1
    IRQ_RISING = 1
    IRQ_FALLING = 2

    def __init__(self, id, mode=-1, pull=-1, value=None):
        self.id = id
        self._mode = mode
        if value is not None:
            self.value(value)

    def init(self, mode=-1, pull=-1, value=None):
        self.__init__(self.id, mode, pull, value)

    def value(self, v=None):
        if v is None:
            return _link.call(_link.PIN, 2, struct.pack("<B", self.id))[0]
        _link.call(_link.PIN, 1, struct.pack("<BB", self.id, 1 if v else 0))

    __call__ = value

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    def irq(self, handler=None, trigger=3):
        return None

    def __repr__(self):
        return "Pin(%d)" % self.id


class Signal:
    def __init__(self, pin, invert=False):
        self._pin = pin if isinstance(pin, Pin) else Pin(pin, Pin.OUT)
        self._invert = invert

    def value(self, v=None):
        if v is None:
            return self._pin.value() ^ self._invert
        self._pin.value((1 if v else 0) ^ self._invert)

    __call__ = value

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)


def _pin_no(p):
    return p.id if isinstance(p, Pin) else int(p)


class ADC:
    ATTN_0DB = 0
    ATTN_2_5DB = 1
    ATTN_6DB = 2
    ATTN_11DB = 3
    WIDTH_12BIT = 3

    def __init__(self, pin, atten=ATTN_11DB):
        self._pin = _pin_no(pin)

    def atten(self, a):
        pass

    def width(self, w):
        pass

    def read_u16(self):
        return struct.unpack("<H", _link.call(_link.ADC, 0, struct.pack("<B", self._pin)))[0]

    def read(self):
        return self.read_u16() >> 4

    def read_uv(self):
        return self.read_u16() * 3300000 // 65535


class PWM:
    def __init__(self, pin, freq=5000, duty_u16=0, duty=None):
        self._pin = _pin_no(pin)
        self._freq = freq
        self._duty = duty_u16 if duty is None else duty * 64
        self._send()

    def _send(self):
        _link.call(_link.PWM, 0, struct.pack("<BIH", self._pin, self._freq, self._duty))

    def freq(self, f=None):
        if f is None:
            return self._freq
        self._freq = f
        self._send()

    def duty_u16(self, d=None):
        if d is None:
            return self._duty
        self._duty = max(0, min(65535, d))
        self._send()

    def duty(self, d=None):
        if d is None:
            return self._duty >> 6
        self.duty_u16(d << 6)

    def deinit(self):
        self._duty = 0
        self._send()


class I2C:
    """Hardware I2C: each transaction goes to the simulated parts on the bus."""

    def __init__(self, id=0, scl=None, sda=None, freq=400000, timeout=50000):
        self._id = id if isinstance(id, int) else 0
        self._freq = freq

    def init(self, scl=None, sda=None, freq=400000):
        self._freq = freq

    def scan(self):
        return list(_link.call(_link.I2C_SCAN, self._id))

    def writeto(self, addr, buf, stop=True):
        try:
            return _link.call(_link.I2C_WRITE, self._id, bytes((addr,)) + bytes(buf))[0]
        except OSError:
            raise OSError(19)  # ENODEV: no ACK, as on the chip

    def readfrom(self, addr, nbytes, stop=True):
        try:
            return bytes(_link.call(_link.I2C_READ, self._id, struct.pack("<BH", addr, nbytes)))
        except OSError:
            raise OSError(19)

    def readfrom_into(self, addr, buf, stop=True):
        data = self.readfrom(addr, len(buf), stop)
        buf[:] = data

    def writevto(self, addr, vector, stop=True):
        return self.writeto(addr, b"".join(vector), stop)

    def readfrom_mem(self, addr, memaddr, nbytes, addrsize=8):
        self.writeto(addr, self._memaddr(memaddr, addrsize), False)
        return self.readfrom(addr, nbytes)

    def readfrom_mem_into(self, addr, memaddr, buf, addrsize=8):
        self.writeto(addr, self._memaddr(memaddr, addrsize), False)
        self.readfrom_into(addr, buf)

    def writeto_mem(self, addr, memaddr, buf, addrsize=8):
        self.writeto(addr, self._memaddr(memaddr, addrsize) + bytes(buf))

    @staticmethod
    def _memaddr(memaddr, addrsize):
        if addrsize == 16:
            return bytes((memaddr >> 8, memaddr & 0xFF))
        return bytes((memaddr,))


SoftI2C = I2C


class UART(_io.IOBase):
    """UART with the driver's RX buffer on the host side; read() never blocks
    longer than `timeout` ms, as on the chip. Pollable for asyncio.StreamReader:
    an empty buffer is asked about again only after a byte time or so."""

    def __init__(self, id, baudrate=115200, bits=8, parity=None, stop=1, tx=None, rx=None,
                 timeout=0, rxbuf=256, **kw):
        self._id = id
        self._line = None
        self._timeout = 0
        self.init(baudrate, bits, parity, stop, tx=tx, rx=rx, timeout=timeout, rxbuf=rxbuf)

    def init(self, baudrate=None, bits=8, parity=None, stop=1, tx=None, rx=None, timeout=None,
             rxbuf=None, **kw):
        """Unspecified settings stay as they are; the driver (and its RX buffer) is
        installed again only when the baud rate or the buffer size changes."""
        old = self._line or (115200, 256)
        line = (baudrate or old[0], rxbuf or old[1])
        if timeout is not None:
            self._timeout = timeout
        self._empty_at = None
        if line != self._line:
            _link.call(_link.UART_INIT, self._id, struct.pack("<IH", line[0], line[1]))
            self._line = line

    def deinit(self):
        pass

    def any(self):
        return struct.unpack("<H", _link.call(_link.UART_READ, self._id, struct.pack("<HH", 0, 0)))[0]

    def read(self, nbytes=-1):
        n = 4096 if nbytes is None or nbytes < 0 else nbytes
        data = _link.call(_link.UART_READ, self._id, struct.pack("<HH", n, self._timeout))[2:]
        return bytes(data) if data else None

    def readinto(self, buf, nbytes=-1):
        data = self.read(len(buf) if nbytes < 0 else nbytes)
        if not data:
            return None
        buf[:len(data)] = data
        return len(data)

    def readline(self):
        line = bytearray()
        while True:
            c = self.read(1)
            if not c:
                return bytes(line) if line else None
            line += c
            if c == b"\n":
                return bytes(line)

    def write(self, buf):
        _link.call(_link.UART_WRITE, self._id, bytes(buf))
        return len(buf)

    def flush(self):
        pass

    def ioctl(self, req, arg):
        if req != _STREAM_POLL:
            return -1  # no descriptor (GET_FILENO): select polls through this method
        ready = arg & 4  # POLLOUT: the TX FIFO is never full here
        if arg & 1:
            now = _t.ticks_ms()
            if self._empty_at is None or _t.ticks_diff(now, self._empty_at) >= 2:
                if self.any():
                    self._empty_at = None
                    ready |= 1
                else:
                    self._empty_at = now
        return ready


class I2S(_io.IOBase):
    """I2S receiver: samples arrive on a socket the host paces at the configured
    rate, as DMA fills the ring on the chip. A blocking readinto() fills the whole
    buffer. Once asyncio polls the object (asyncio.StreamReader), readinto()
    returns what the ring holds, in whole frames, as the ESP32 port's asyncio
    mode does; polling uses the socket's descriptor."""

    RX = 0
    TX = 1
    MONO = 0
    STEREO = 1

    def __init__(self, id, sck=None, ws=None, sd=None, mode=0, bits=32, format=0, rate=16000,
                 ibuf=20000):
        import emu_socket
        _s = emu_socket._real  # the I2S wires are not Wi-Fi: never resolve through the radio
        port = struct.unpack("<H", _link.call(
            _link.I2S_INIT, id, struct.pack("<BBBIi", mode, bits, format, rate, ibuf)))[0]
        self._sock = _s.socket()
        try:  # SOL_SOCKET, SO_RCVBUF: the DMA ring is `ibuf` on the host, not a kernel queue
            self._sock.setsockopt(1, 8, 4096)
        except OSError:
            pass
        self._sock.connect(_s.getaddrinfo("127.0.0.1", port)[0][-1])
        self._rate = rate
        self._frame = (bits // 8) * (2 if format == I2S.STEREO else 1)
        self._step = max(self._frame, min(1024, ibuf - ibuf % self._frame))
        self._async = False
        self._ack = bytearray(4)  # reused: the emulator's own work must not churn the heap

    def _recv(self, mv, wait=True):
        """One socket read; the host then hears how much left its DMA ring. A blocking
        read asks for at most one step: socket readinto waits for all it asks for, and
        the host keeps only a few steps in flight until it hears back."""
        if wait:
            k = self._sock.readinto(mv[:self._step])
        else:  # what is there, into the caller's buffer (recv would allocate up to 4 KB)
            self._sock.setblocking(False)
            try:
                k = self._sock.readinto(mv)
            finally:
                self._sock.setblocking(True)
            if k is None:  # nothing after all: wait for it as a blocking read would
                return self._recv(mv, True)
        if not k:
            raise OSError(5)
        struct.pack_into("<I", self._ack, 0, k)
        self._sock.write(self._ack)
        return k

    def _fill(self, mv, got, want):
        while got < want:
            got += self._recv(mv[got:want])
        return got

    def readinto(self, buf):
        mv = memoryview(buf)
        n = len(buf) - len(buf) % self._frame
        if not self._async or not n:
            return self._fill(mv, 0, n)
        got = self._recv(mv[:n], False)  # poll said readable: this does not wait
        return self._fill(mv, got, got + (-got) % self._frame)  # finish the last frame

    def ioctl(self, req, arg):
        if req == _STREAM_GET_FILENO:
            self._async = True
            return self._sock.fileno()
        if req == _STREAM_POLL:
            self._async = True
            import select
            p = select.poll()
            p.register(self._sock, select.POLLIN)
            return arg & select.POLLIN if p.poll(0) else 0
        return 0

    def deinit(self):
        self._sock.close()

    def irq(self, handler):
        raise NotImplementedError("use readinto or asyncio.StreamReader on the emulated board")

    @staticmethod
    def shift(buf, bits, shift):
        """Scale samples in place by 2**shift (volume), as machine.I2S.shift does."""
        fmt = "<h" if bits == 16 else "<i"
        size = 2 if bits == 16 else 4
        for i in range(0, len(buf) - size + 1, size):
            v = struct.unpack_from(fmt, buf, i)[0]
            v = v << shift if shift >= 0 else v >> -shift
            lim = 1 << (bits - 1)
            struct.pack_into(fmt, buf, i, max(-lim, min(lim - 1, v)))


class WDT:
    def __init__(self, id=0, timeout=5000):
        _link.call(_link.WDT_INIT, 0, struct.pack("<I", timeout))

    def feed(self):
        _link.call(_link.WDT_FEED)


class RTC:
    def __init__(self, id=0):
        pass

    def datetime(self, dt=None):
        import emu_time
        if dt is None:
            y, mo, d, h, mi, s, wd, yd = emu_time.localtime()
            return (y, mo, d, wd, h, mi, s, 0)
        emu_time.set_time(emu_time.mktime((dt[0], dt[1], dt[2], dt[4], dt[5], dt[6], 0, 0)))

    def init(self, dt):
        self.datetime(dt)

    def memory(self, data=None):
        if data is None:
            return _link.call(_link.NVS, 4)
        _link.call(_link.NVS, 5, bytes(data))


class Timer:
    """A hardware timer: a thread stands in for the timer peripheral and hands the
    callback to the VM with micropython.schedule, as the timer ISR does on the chip
    (so callbacks run between bytecodes, soft-IRQ style)."""

    ONE_SHOT = 0
    PERIODIC = 1

    def __init__(self, id=-1, **kw):
        self._gen = 0
        if kw:
            self.init(**kw)

    def init(self, mode=PERIODIC, period=-1, freq=-1, callback=None):
        import _thread
        if freq > 0:
            period = 1000 // freq
        if period <= 0:
            raise ValueError("period or freq required")
        self._gen += 1
        _thread.start_new_thread(self._run, (self._gen, mode, period, callback))

    def _run(self, gen, mode, period, callback):
        import micropython
        while gen == self._gen:
            _t.sleep_ms(period)
            if gen != self._gen:
                return
            if callback is not None:
                try:
                    micropython.schedule(callback, self)
                except RuntimeError:  # schedule queue full: the tick is lost, as on the chip
                    pass
            if mode == Timer.ONE_SHOT:
                return

    def deinit(self):
        self._gen += 1

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


def _chip():
    return _board().get("chip", "esp32")


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


def freq(hz=None):
    """The CPU clock. Set, it holds across a soft reset (esp_pm's setting), and at chip
    speed the VM runs that much faster or slower (emulator/board.py)."""
    if hz is None:
        return _board()["cpu_hz"]
    mhz = int(hz) // 1000000            # the port's own rounding
    if _chip() == "esp32c3":
        if mhz not in (20, 40, 80, 160):
            raise ValueError("frequency must be 20MHz, 40MHz, 80Mhz or 160MHz")
    elif mhz not in (20, 40, 80, 160, 240):
        raise ValueError("frequency must be 20MHz, 40MHz, 80Mhz, 160MHz or 240MHz")
    _link.call(_link.CPU_FREQ, 0, struct.pack("<I", mhz))
    _board()["cpu_hz"] = mhz * 1000000


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
    """LEDC PWM as the ESP32 port sets it up: 5 kHz and 50 % unless told otherwise,
    duty checked (not clamped), and printed as the port prints it."""

    def __init__(self, pin, freq=-1, duty=-1, duty_u16=-1, duty_ns=-1):
        self._pin = _pin_no(pin)
        self._freq = 5000
        self._duty = 32768
        self._scale = "duty_u16"
        self._on = True
        self.init(freq, duty=duty, duty_u16=duty_u16)

    def init(self, freq=-1, duty=-1, duty_u16=-1, duty_ns=-1):
        if freq != -1:
            self._check_freq(freq)
            self._freq = freq
        if duty_u16 >= 0:
            self._set_u16(duty_u16)
        elif duty >= 0:
            self._set_u10(duty)
        self._on = True
        self._send()

    @staticmethod
    def _check_freq(f):
        if f <= 0 or f > 40000000:
            raise ValueError("frequency must be from 1Hz to 40MHz")

    def _set_u16(self, d):
        if d < 0 or d > 65535:
            raise ValueError("duty_u16 must be from 0 to 65536")
        self._duty, self._scale = d, "duty_u16"

    def _set_u10(self, d):
        if d < 0 or d > 1023:
            raise ValueError("duty must be from 0 to 1023")
        self._duty, self._scale = (65535 if d == 1023 else d << 6), "duty"

    def _send(self):
        _link.call(_link.PWM, 0, struct.pack("<BIH", self._pin, self._freq,
                                            self._duty if self._on else 0))

    def freq(self, f=None):
        if f is None:
            return self._freq
        self._check_freq(f)
        self._freq = f
        self._send()

    def duty_u16(self, d=None):
        if d is None:
            return self._duty
        self._set_u16(d)
        self._send()

    def duty(self, d=None):
        if d is None:
            return self._duty >> 6
        self._set_u10(d)
        self._send()

    def deinit(self):
        self._on = False
        self._send()

    def __repr__(self):
        if not self._on:
            return "PWM(Pin(%u))" % self._pin
        value = self._duty >> 6 if self._scale == "duty" else self._duty
        return "PWM(Pin(%u), freq=%u, %s=%d)" % (self._pin, self._freq, self._scale, value)


_ENODEV = 19
_ETIMEDOUT = 116  # the chip's (newlib) number; the unix port's errno module says 110


def _i2c_error(e):
    """What the ESP32 port raises: ETIMEDOUT when a part holds the bus (the host waited
    the chip's timeout), ENODEV for a NACK and anything else."""
    if e.errno == _ETIMEDOUT:
        return OSError(_ETIMEDOUT, "ETIMEDOUT")
    return OSError(_ENODEV)


# The ESP32 port's default I2C pins (machine_i2c.h): (scl, sda) of I2C0 and I2C1
_I2C_PINS = {"esp32": ((18, 19), (25, 26)), "esp32s3": ((9, 8), (9, 8)),
             "esp32c3": ((9, 8),)}
_I2C_TIMEOUT_US = 50000


class I2C:
    """Hardware I2C: each transaction goes to the simulated parts on the bus. Printed
    as the ESP32 port prints it; the ids the chip has (I2C0 only on an ESP32-C3). One
    object per controller, as the port's static ones: I2C(0) again is the same object
    and keeps the pins it was given."""

    _hw = {}

    def __new__(cls, *args, **kw):
        if cls is not I2C:
            return object.__new__(cls)
        id = args[0] if args else kw.get("id", 0)
        pins = _I2C_PINS.get(_chip(), _I2C_PINS["esp32"])
        if not 0 <= id < len(pins):
            raise ValueError("I2C(%d) doesn't exist" % id)
        obj = I2C._hw.get(id)
        if obj is None:
            obj = I2C._hw[id] = object.__new__(cls)
            obj._id = id
            obj._scl, obj._sda = pins[id]
            obj._freq = 400000
            obj._timeout = _I2C_TIMEOUT_US
        return obj

    def __init__(self, id=0, *, scl=None, sda=None, freq=-1, timeout=-1):
        self.init(scl=scl, sda=sda, freq=freq, timeout=timeout)

    def init(self, *, scl=None, sda=None, freq=-1, timeout=-1):
        if scl is not None:
            self._scl = _pin_no(scl)
        if sda is not None:
            self._sda = _pin_no(sda)
        if freq > 0:
            self._freq = freq
        if timeout != -1:
            self._timeout = timeout

    def __repr__(self):
        return "I2C(%u, scl=%u, sda=%u, freq=%u, timeout=%u)" % (
            self._id, self._scl, self._sda, self._freq, self._timeout)

    def scan(self):
        return list(_link.call(_link.I2C_SCAN, self._id))

    def writeto(self, addr, buf, stop=True):
        try:
            return _link.call(_link.I2C_WRITE, self._id, bytes((addr,)) + bytes(buf))[0]
        except OSError as e:
            raise _i2c_error(e)

    def readfrom(self, addr, nbytes, stop=True):
        try:
            return bytes(_link.call(_link.I2C_READ, self._id, struct.pack("<BH", addr, nbytes)))
        except OSError as e:
            raise _i2c_error(e)

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


class SoftI2C(I2C):
    """Bit-banged I2C (extmod/machine_i2c.c): on the same wires here, printed with the
    frequency its half-period delay gives (500 kHz for anything above 250 kHz)."""

    def __init__(self, scl, sda, *, freq=400000, timeout=50000):
        self._id = 0
        self._scl, self._sda = _pin_no(scl), _pin_no(sda)
        self._timeout = timeout
        self._delay_us = max(1, 500000 // freq)

    def init(self, scl, sda, *, freq=400000, timeout=50000):
        self.__init__(scl, sda, freq=freq, timeout=timeout)

    def __repr__(self):
        return "SoftI2C(scl=%u, sda=%u, freq=%u)" % (self._scl, self._sda,
                                                      500000 // self._delay_us)


class UART(_io.IOBase):
    """UART with the driver's RX buffer on the host side; read() never blocks
    longer than `timeout` ms, as on the chip. Pollable for asyncio.StreamReader:
    an empty buffer is asked about again only after a byte time or so."""

    _objs = {}

    def __new__(cls, id, *args, **kw):
        """One object per UART, as the port keeps them: UART(2) again is the same one,
        with the settings it had."""
        if not 0 <= id < (2 if _chip() == "esp32c3" else 3):
            raise ValueError("UART(%d) does not exist" % id)
        obj = UART._objs.get(id)
        if obj is None:
            obj = UART._objs[id] = object.__new__(cls)
            obj._id = id
            obj._line = None
            obj._timeout = 0
            obj._timeout_char = 0
            obj._bits, obj._parity, obj._stop = 8, 0, 1
            obj._txbuf = 256
            # the port's default pins: UART0 keeps the REPL's (-1: not changed)
            psram = _chip() == "esp32" and _board().get("psram")
            obj._tx, obj._rx = ((-1, -1), (5, 4) if psram else (10, 9), (17, 16))[id]
        return obj

    def __init__(self, id, baudrate=0, bits=0, parity=-1, stop=0, tx=None, rx=None,
                 **kw):
        self.init(baudrate, bits, parity, stop, tx=tx, rx=rx, **kw)

    def init(self, baudrate=0, bits=0, parity=-1, stop=0, tx=None, rx=None, timeout=-1,
             timeout_char=-1, rxbuf=-1, txbuf=-1, **kw):
        """Unspecified settings stay as they are. As on the chip, every init discards what
        the RX buffer holds (uart_flush_input); UART0 is the REPL's: its buffers are
        fixed."""
        old = self._line or (115200, 256)
        if self._id == 0 and ((rxbuf >= 0 and rxbuf != old[1]) or
                              (txbuf >= 0 and txbuf != self._txbuf)):
            raise ValueError("REPL UART buffer size is fixed")
        line = (baudrate or old[0], rxbuf if rxbuf >= 0 else old[1])
        if txbuf >= 0:
            self._txbuf = txbuf
        if tx is not None:
            self._tx = _pin_no(tx)
        if rx is not None:
            self._rx = _pin_no(rx)
        if bits:
            self._bits = bits
        if parity is None:
            self._parity = 0
        elif parity != -1:
            self._parity = 1 if parity & 1 else 2
        if stop:
            self._stop = stop
        if timeout != -1:
            self._timeout = timeout
        if timeout_char != -1:
            self._timeout_char = timeout_char
        self._empty_at = None
        _link.call(_link.UART_INIT, self._id, struct.pack("<IH", line[0], line[1]))
        self._line = line

    def __repr__(self):
        # the baud rate the 80 MHz clock's divider (16ths) gives: 115200 reads 115201
        clk = 80000000 * 16
        baud = clk // (clk // self._line[0])
        return ("UART(%u, baudrate=%u, bits=%u, parity=%s, stop=%u, tx=%d, rx=%d, rts=-1, "
                "cts=-1, txbuf=%u, rxbuf=%u, timeout=%u, timeout_char=%u, irq=0)" % (
                    self._id, baud, self._bits, ("None", "1", "0")[self._parity], self._stop,
                    self._tx, self._rx, self._txbuf, self._line[1], self._timeout,
                    self._timeout_char))

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
    returns what the ring holds, in whole frames, 0 when it is empty, as the ESP32
    port's asyncio mode does; polling uses the socket's descriptor.

    The ring's bound is kept here: the host sends everything due, and before each
    read this end drops what the chip's DMA would have overwritten by now, the
    oldest, so a read after a stall returns the newest ring's worth, as on the chip
    (emulator/i2s.py)."""

    RX = 1      # I2S_DIR_RX, I2S_DIR_TX on the ESP32 port
    TX = 2
    MONO = 0
    STEREO = 1
    _DMA_BUF_FRAMES = 256       # the driver hands over whole DMA buffers
    # What the ESP32 port's readinto costs the chip at 240 MHz (machine_i2s.c,
    # fill_appbuf_from_dma): i2s_read() out of the DMA buffers in 240-byte pieces,
    # then a byte-by-byte frame map loop. Taken high where unsure: 0.5 us (120 cycles)
    # a frame, 10 us a call.
    READ_CALL_NS = 10000
    READ_FRAME_NS = 500
    _ACK_DROPPED = 1 << 31

    def __init__(self, id, *, sck, ws, sd, mode, bits, format, rate, ibuf):
        import emu_socket
        _s = emu_socket._real  # the I2S wires are not Wi-Fi: never resolve through the radio
        if mode not in (I2S.RX, I2S.TX):
            raise ValueError("invalid mode")
        self._desc = (id, _pin_no(sck), _pin_no(ws), _pin_no(sd), mode, bits, format, rate,
                      ibuf)
        wire_mode = 0 if mode == I2S.RX else 1  # the host's numbering (peripherals.py)
        port, ring_frames, self._start_us = struct.unpack("<HIq", _link.call(
            _link.I2S_INIT, id, struct.pack("<BBBIi", wire_mode, bits, format, rate, ibuf)))
        self._sock = _s.socket()
        self._sock.setsockopt(1, 12, 6)  # SO_PRIORITY 6: the chip's own wire (chipclock.c)
        try:  # SOL_SOCKET, SO_RCVBUF: the host sends all that is due, the ring's bound is ours
            self._sock.setsockopt(1, 8, 1 << 20)
        except OSError:
            pass
        self._sock.connect(_s.getaddrinfo("127.0.0.1", port)[0][-1])
        self._rate = rate
        self._frame = (bits // 8) * (2 if format == I2S.STEREO else 1)
        self._ring = ring_frames * self._frame      # bytes the DMA ring holds
        self._taken = 0                              # bytes read or dropped since the start
        import emu_time
        self._host_ns = emu_time._real.time_ns       # the host's real-time clock
        self._step = max(self._frame, min(1024, ibuf - ibuf % self._frame))
        self._async = False
        self._ack = bytearray(4)  # reused: the emulator's own work must not churn the heap

    def _ack_host(self, k):
        self._taken += k & ~I2S._ACK_DROPPED
        struct.pack_into("<I", self._ack, 0, k)
        self._sock.write(self._ack)

    def _drop_overwritten(self, mv, n):
        """Throw away what the chip's DMA would have overwritten by now: all but the
        newest ring's worth of what is due by the sample clock (the host's real-time
        clock: at chip speed the VM's ticks run ahead of it inside a burst). Only after a stall longer than the
        ring; the host has sent it all by then (it lags the clock by one DMA tick)."""
        due = (self._host_ns() // 1000 - self._start_us) * self._rate // 1000000
        due -= due % I2S._DMA_BUF_FRAMES
        excess = due * self._frame - self._taken - self._ring
        dropped = 0
        while excess > 0:
            k = self._sock.readinto(mv[:min(excess, n)])
            if not k:  # None: not here yet, or 0: closed (the next read says so)
                break
            excess -= k
            dropped += k
        if dropped:
            self._ack_host(I2S._ACK_DROPPED | dropped)

    def _recv(self, mv, wait=True):
        """One socket read; the host then hears how much left its DMA ring. A blocking
        read asks for at most one step: socket readinto waits for all it asks for. Once
        asyncio polls, the socket is non-blocking for good: the fewest calls per read,
        since the emulator's own work here is charged as the chip's at chip speed."""
        if not self._async:
            k = self._sock.readinto(mv[:self._step])
        else:
            k = self._sock.readinto(mv)
            while k is None:  # the ring is empty
                if not wait:
                    return 0
                self._poller.poll(-1)
                k = self._sock.readinto(mv)
        if not k:
            raise OSError(5)
        self._ack_host(k)
        return k

    def _fill(self, mv, got, want):
        while got < want:
            got += self._recv(mv[got:want])
        return got

    def readinto(self, buf):
        mv = memoryview(buf)
        n = len(buf) - len(buf) % self._frame
        if not self._async or not n:
            if n:
                self._drop_overwritten(mv, n)
            return self._fill(mv, 0, n)
        _link.driver_begin()    # the port's C: the chip's time for it (READ_*), not Python's
        got = 0
        try:
            self._drop_overwritten(mv, n)
            got = self._recv(mv[:n], False)  # poll said readable: this does not wait
            got = self._fill(mv, got, got + (-got) % self._frame)  # finish the last frame
            return got
        finally:
            _link.driver_end((I2S.READ_CALL_NS + got // self._frame * I2S.READ_FRAME_NS)
                             * 240 // (_board()["cpu_hz"] // 1000000))

    def _asyncio_mode(self):
        """What the ESP32 port does on a poll: readinto no longer waits."""
        if not self._async:
            import select
            self._async = True
            self._sock.setblocking(False)
            self._poller = select.poll()
            self._poller.register(self._sock, select.POLLIN)

    def ioctl(self, req, arg):
        if req == _STREAM_GET_FILENO:
            self._asyncio_mode()
            return self._sock.fileno()
        if req == _STREAM_POLL:
            self._asyncio_mode()
            return arg & 1 if self._poller.poll(0) else 0  # 1: POLLIN
        return 0

    def deinit(self):
        self._sock.close()

    def __repr__(self):
        return ("I2S(id=%u,\nsck=%u,\nws=%u,\nsd=%u,\nmode=%u,\nbits=%u, format=%u,\n"
                "rate=%d, ibuf=%d)" % self._desc)

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
    """The task watchdog's one user. As on the ESP32 port, WDT() returns the same
    object every time and reconfigures the one dog (its timer starts again); nothing
    stops it but a hard reset: it runs on across a soft reset (the host keeps it)."""

    _one = None

    def __new__(cls, id=0, timeout=5000):
        if id != 0:
            raise ValueError
        if timeout <= 0:
            raise ValueError("WDT timeout too short")
        _link.call(_link.WDT_INIT, 0, struct.pack("<I", timeout))
        if WDT._one is None:
            WDT._one = object.__new__(cls)
        return WDT._one

    def __init__(self, id=0, timeout=5000):
        pass

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

"""The simulated parts on an emulated board's buses, and the wires between them.

The board core's bus handler calls one method per bus transaction (emulator/bus.py
frames, board side in board_side/emu_machine.py). This module routes each call to the
part at that address, UART or I2S port, as the pole is wired in boards.yaml, and
does what the silicon between them would do: NACK where nothing answers, the UART
driver's RX ring buffer filled at the line's pace, the I2S DMA buffer that drops
the oldest samples when the firmware falls behind.

Wiring notes: the I2C parts answer on every controller id (the ESP32's GPIO matrix
can route I2C0 or I2C1 to the pole's SDA/SCL, and the board side does not send
pins); the PMS5003 sits on the UART id and the microphone on the I2S id that
boards.yaml gives. The supply-voltage divider (2:1) is on GPIO 35 unless the
board's pins name `vbus_adc`.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from citynode.boards import Board

from .devices.bh1750 import BH1750
from .devices.bme280 import BME280
from .devices.mic import Microphone, to_slots
from .devices.pms5003 import BAUD as PMS_BAUD
from .devices.pms5003 import PMS5003
from .scenario import Scenario

log = logging.getLogger(__name__)

SENSORS = ("bh1750", "bme280", "pms5003", "mic")
I2S_RX, I2S_TX = 0, 1            # board_side/emu_machine.py I2S.RX / I2S.TX
I2S_STEREO = 1
SUPPLY_ADC_PIN = 35
SUPPLY_DIVIDER = 0.5
ADC_FULL_SCALE_V = 3.3           # what board_side/emu_machine.py's read_uv assumes at 65535
I2S_TICK = 0.003                 # how often the DMA pump wakes (in flight lasts 21+ ms)
I2S_SNDBUF = 4096                # keep the kernel's share of the DMA ring small
I2S_IN_FLIGHT = 4096             # ring bytes handed to the socket ahead of the board's reads
UART_LOOKAHEAD = 0.05           # a waiting read looks this far ahead on the line
I2S_BLOCK = 2048                 # samples generated per numpy call (FFT-friendly)


@dataclass
class UartPort:
    """One UART's driver state on the board: baud rate and RX ring buffer."""

    baudrate: int
    rxbuf: int
    buffer: bytearray = field(default_factory=bytearray)
    dropped: int = 0


class I2SStream:
    """Paces samples to the board over a loopback socket, as DMA fills the ring.

    Wire: raw slots host -> board; board -> host, after every socket read, the number
    of bytes it took (<I, little-endian). So the host knows exactly what the ring
    holds (handed over but unread, plus not yet handed over), drops the oldest
    samples when it would exceed `ibuf`, and keeps at most I2S_IN_FLIGHT bytes in
    the kernel, where they could no longer be dropped.
    """

    def __init__(self, mic: Microphone | None, wall: Callable[[], float], rate: int, bits: int,
                 stereo: bool, ibuf: int, silent: Callable[[], bool]) -> None:
        self.mic, self.rate, self.bits, self.stereo = mic, rate, bits, stereo
        self._wall = wall
        self.start = mic.start_wall if mic is not None else wall()
        self.frame_bytes = (bits // 8) * (2 if stereo else 1)
        self.ibuf = max(ibuf, self.frame_bytes)
        self._silent = silent
        self.overruns = 0
        self.dropped_bytes = 0
        self._closed = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self._conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name=f"i2s-{self.port}", daemon=True)
        self._thread.start()

    def _samples(self, n: int) -> bytes:
        if self.mic is None:
            return bytes(n * self.frame_bytes)
        return to_slots(self.mic.block(n), self.bits, self.stereo)

    def _accept(self) -> socket.socket | None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return None
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, I2S_SNDBUF)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(False)
            return conn
        return None

    def _run(self) -> None:
        conn = self._accept()
        if conn is None:
            return
        self._conn = conn
        wall, start = self._wall, self.start
        produced = 0            # samples released into the DMA ring so far
        pending = bytearray()   # in the ring, not yet handed to the socket
        ahead = bytearray()     # generated in efficient blocks, not yet due
        sent = consumed = 0     # bytes handed to the socket / acknowledged read by the board
        acks = bytearray()
        try:
            while not self._closed.is_set():
                acks += _drain(conn)
                while len(acks) >= 4:
                    consumed += struct.unpack_from("<I", acks)[0]
                    del acks[:4]
                due = int((wall() - start) * self.rate)
                backlog = due - produced
                capacity = self.ibuf // self.frame_bytes
                if backlog > capacity + I2S_BLOCK:  # far behind: skip what DMA would drop
                    skip = backlog - capacity
                    from_ahead = min(skip, len(ahead) // self.frame_bytes)
                    del ahead[:from_ahead * self.frame_bytes]
                    if self.mic:
                        self.mic.skip(skip - from_ahead)
                    produced += skip
                    self._overrun(skip * self.frame_bytes + len(pending))
                    pending.clear()
                if due > produced:
                    need = (due - produced) * self.frame_bytes
                    while len(ahead) < need:
                        ahead += self._samples(I2S_BLOCK)
                    if self._silent():  # unplugged: the ESP32 still clocks, SD reads 0
                        pending += bytes(need)
                    else:
                        pending += ahead[:need]
                    del ahead[:need]
                    produced = due
                # The ring holds what the board has not read yet: in flight plus pending.
                in_flight = sent - consumed
                excess = in_flight + len(pending) - self.ibuf
                if excess > 0:  # full: the oldest samples still in our hands go
                    excess = min(len(pending), -(-excess // self.frame_bytes) * self.frame_bytes)
                    del pending[:excess]
                    self._overrun(excess)
                room = min(self.ibuf, I2S_IN_FLIGHT) - in_flight
                if pending and room > 0:
                    try:
                        n = conn.send(pending[:room])
                        del pending[:n]
                        sent += n
                    except BlockingIOError:
                        pass
                self._closed.wait(I2S_TICK)
        except (OSError, EOFError):
            pass  # the board closed its end (deinit, reset, power cut)
        finally:
            conn.close()

    def _overrun(self, nbytes: int) -> None:
        if nbytes > 0:
            self.overruns += 1
            self.dropped_bytes += nbytes

    def close(self) -> None:
        self._closed.set()
        self._server.close()
        if self._conn is not None:
            try:
                self._conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=2)


def _drain(conn: socket.socket) -> bytes:
    """Whatever the board sent back (its read acknowledgements); EOF when it closed."""
    data = bytearray()
    while True:
        try:
            chunk = conn.recv(4096)
        except BlockingIOError:
            return bytes(data)
        if not chunk:
            raise EOFError
        data += chunk


class Peripherals:
    """Every simulated part on one board, addressed as the board's firmware sees them."""

    def __init__(self, board: Board, scenario: Scenario, seed: int | None = None) -> None:
        """seed: the parts' own noise (warm-up, mic self-noise, bus garbage); by default
        derived from the scenario's seed. Boards sharing one Scenario (one world) can
        pass their index here so that their parts do not hiss in unison."""
        self.board = board
        self.scenario = scenario
        self._lock = threading.RLock()
        seed = zlib.crc32(board.name.encode()) ^ (scenario.seed if seed is None else seed)
        self._seed = seed
        sensors = board.sensors
        wall = scenario.wall
        self.unplugged: set[str] = set()
        self.pins: dict[int, int] = {0: 1}          # GPIO0 has the BOOT button's pull-up
        self.adc_overrides: dict[int, int] = {}
        self.pwm_state: dict[int, tuple[int, int]] = {}
        self.lamp_pin = board.pins.get("lamp_pwm")
        self.pms_set_pin = board.pins.get("pms_set")
        self.supply_pin = board.pins.get("vbus_adc", SUPPLY_ADC_PIN)

        self.i2c: dict[int, Any] = {}
        self._names: dict[str, Any] = {}
        if "bh1750" in sensors:
            dev = BH1750(self._light, wall, seed=seed + 1)
            self.i2c[sensors["bh1750"]["address"]] = dev
            self._names["bh1750"] = dev
        if "bme280" in sensors:
            dev = BME280(self._weather, wall, seed=seed + 2)
            self.i2c[sensors["bme280"]["address"]] = dev
            self._names["bme280"] = dev
        self.pms: PMS5003 | None = None
        self.pms_uart: int | None = None
        if "pms5003" in sensors:
            self.pms = PMS5003(self._air, wall, seed=seed + 3, warm=True)
            self.pms.listening = False  # until the firmware opens its UART
            self.pms_uart = int(sensors["pms5003"].get("uart", 2))
            self.pms_baud = int(sensors["pms5003"].get("baud", PMS_BAUD))
        self.mic_i2s = int(sensors["mic"].get("i2s", 0)) if "mic" in sensors else None
        self.uarts: dict[int, UartPort] = {}
        self.streams: dict[int, I2SStream] = {}
        self._closed_overruns = 0
        self._closed_dropped = 0

    # -- the physics each part sees ---------------------------------------------------------
    def lamp_level(self) -> float:
        """The pole lamp's PWM duty, 0..1."""
        if self.lamp_pin is None:
            return 0.0
        if self.lamp_pin in self.pwm_state:
            return self.pwm_state[self.lamp_pin][1] / 65535
        return float(self.pins.get(self.lamp_pin, 0))

    def _light(self, wall: float) -> float:
        t = self.scenario.at_wall(wall)
        return self.scenario.lux(t) + self.scenario.params.lamp_spill_lux * self.lamp_level()

    def _weather(self, wall: float) -> tuple[float, float, float]:
        t = self.scenario.at_wall(wall)
        s = self.scenario
        return s.temperature(t), s.pressure(t), s.humidity(t)

    def _air(self, wall: float) -> tuple[float, float, float]:
        return self.scenario.pm(self.scenario.at_wall(wall))

    # -- I2C ---------------------------------------------------------------------------------
    def _i2c_device(self, addr: int) -> Any:
        dev = self.i2c.get(addr)
        if dev is None or self._sensor_name(dev) in self.unplugged:
            raise OSError(errno.ENODEV, f"no ACK from I2C address 0x{addr:02x}")
        return dev

    def _sensor_name(self, dev: Any) -> str:
        return next(name for name, d in self._names.items() if d is dev)

    def i2c_scan(self, bus: int) -> list[int]:
        with self._lock:
            return sorted(a for a, d in self.i2c.items()
                          if self._sensor_name(d) not in self.unplugged)

    def i2c_write(self, bus: int, addr: int, data: bytes) -> int:
        with self._lock:
            return self._i2c_device(addr).write(bytes(data))

    def i2c_read(self, bus: int, addr: int, n: int) -> bytes:
        with self._lock:
            return self._i2c_device(addr).read(n)

    # -- UART --------------------------------------------------------------------------------
    def uart_init(self, uart_id: int, baudrate: int, rxbuf: int) -> None:
        with self._lock:
            self._pump(uart_id)  # what arrived before this init went to the old buffer
            self.uarts[uart_id] = UartPort(baudrate, max(1, rxbuf))
            if uart_id == self.pms_uart and self.pms is not None:
                self.pms.take(self.scenario.wall())  # an uninitialised UART heard nothing
                self.pms.listening = True

    def _pump(self, uart_id: int, until: float | None = None) -> None:
        """Move the bytes that reached the RX pin by `until` into the driver's buffer."""
        port = self.uarts.get(uart_id)
        if uart_id != self.pms_uart or self.pms is None:
            return
        data = self.pms.take(self.scenario.wall() if until is None else until)
        if port is None or not data or "pms5003" in self.unplugged:
            return
        if port.baudrate != self.pms_baud:  # wrong baud rate: framing garbage
            data = bytes((b * 0x9D + 0x5B) & 0xFF for b in data)
        room = port.rxbuf - len(port.buffer)
        port.buffer += data[:max(0, room)]
        port.dropped += max(0, len(data) - max(0, room))  # a full ring drops the newest

    def uart_write(self, uart_id: int, data: bytes) -> None:
        with self._lock:
            port = self.uarts.get(uart_id)
            if (uart_id != self.pms_uart or self.pms is None or port is None
                    or "pms5003" in self.unplugged or port.baudrate != self.pms_baud):
                return
            done = self.scenario.wall() + len(data) * 10 / port.baudrate
            self._pump(uart_id)
            self.pms.receive(bytes(data), done)

    def uart_read(self, uart_id: int, n: int, timeout_ms: int) -> tuple[int, bytes]:
        """Waits until n bytes are buffered or timeout_ms passes (uart_read_bytes)."""
        clock = self.scenario.clock
        deadline = self.scenario.wall() + max(0, timeout_ms) / 1000.0
        while True:
            with self._lock:
                self._pump(uart_id)
                port = self.uarts.get(uart_id)
                if port is None:
                    return 0, b""
                have = len(port.buffer)
                now = self.scenario.wall()
                if have >= n or now >= deadline:
                    data = bytes(port.buffer[:n])
                    del port.buffer[:n]
                    return have, data
                wake = deadline
                if (uart_id == self.pms_uart and self.pms is not None
                        and "pms5003" not in self.unplugged):
                    times = self.pms.arrivals(min(deadline, now + UART_LOOKAHEAD))
                    need = n - have
                    if len(times) >= need:
                        wake = min(deadline, times[need - 1])
            clock.sleep(max(0.0, min(wake - now, UART_LOOKAHEAD)) or 0.0005)

    # -- I2S ---------------------------------------------------------------------------------
    def i2s_open(self, i2s_id: int, mode: int, bits: int, fmt: int, rate: int, ibuf: int) -> int:
        if mode != I2S_RX:
            raise OSError(errno.EINVAL, "only I2S RX: no I2S transmitter part is attached")
        if bits not in (16, 32) or not 8000 <= rate <= 96000:
            raise OSError(errno.EINVAL, "I2S: bits 16 or 32, rate 8000..96000")
        with self._lock:
            self._close_stream(i2s_id)
            mic = self.microphone(rate) if i2s_id == self.mic_i2s else None
            stream = I2SStream(mic, self.scenario.wall, rate, bits, fmt == I2S_STEREO, ibuf,
                               silent=lambda: "mic" in self.unplugged)
            self.streams[i2s_id] = stream
            return stream.port

    def microphone(self, rate: int) -> Microphone:
        """A fresh sample stream from this board's microphone, starting now."""
        return Microphone(self.scenario, rate, seed=self._seed + 4)

    def _close_stream(self, i2s_id: int) -> None:
        stream = self.streams.pop(i2s_id, None)
        if stream is not None:
            stream.close()
            self._closed_overruns += stream.overruns
            self._closed_dropped += stream.dropped_bytes

    # -- pins, ADC, PWM ------------------------------------------------------------------------
    def adc_read(self, pin: int) -> int:
        with self._lock:
            if pin in self.adc_overrides:
                return self.adc_overrides[pin]
            if pin == self.supply_pin:
                volts = self.scenario.supply_volts(self.scenario.now()) * SUPPLY_DIVIDER
                return max(0, min(65535, round(volts / ADC_FULL_SCALE_V * 65535)))
            return 0

    def set_adc(self, pin: int, value: int | None) -> None:
        """Pin an ADC reading (tests); None releases it."""
        with self._lock:
            if value is None:
                self.adc_overrides.pop(pin, None)
            else:
                self.adc_overrides[pin] = max(0, min(65535, int(value)))

    def pin_write(self, pin: int, value: int) -> None:
        with self._lock:
            self.pins[pin] = 1 if value else 0
            self.pwm_state.pop(pin, None)  # a GPIO write takes the pin back from the PWM
            if pin == self.pms_set_pin and self.pms is not None:
                self.pms.set_pin_level(self.pins[pin])

    def pin_read(self, pin: int) -> int:
        with self._lock:
            return self.pins.get(pin, 0)

    def set_input(self, pin: int, value: int) -> None:
        """Drive an input pin from outside (tests: a button, a door contact)."""
        with self._lock:
            self.pins[pin] = 1 if value else 0

    def pwm(self, pin: int, freq: int, duty_u16: int) -> None:
        with self._lock:
            self.pwm_state[pin] = (int(freq), max(0, min(65535, int(duty_u16))))

    # -- faults --------------------------------------------------------------------------------
    def fault(self, name: str, **kw: Any) -> None:
        """'unplug' / 'plug' (sensor=...), 'corrupt' (sensor=..., count=1,
        kind='checksum'|'garbage' for the PMS5003)."""
        sensor = kw.get("sensor")
        with self._lock:
            if name in ("unplug", "plug"):
                if sensor not in SENSORS or sensor not in self.board.sensors:
                    raise ValueError(f"{name}: sensor must be one of "
                                     f"{', '.join(s for s in SENSORS if s in self.board.sensors)}")
                if name == "unplug":
                    self._unplug(sensor)
                else:
                    self._plug(sensor)
            elif name == "corrupt":
                count = int(kw.get("count", 1))
                if sensor == "pms5003" and self.pms is not None:
                    self.pms.corrupt(count, kw.get("kind", "checksum"))
                elif sensor in ("bh1750", "bme280") and sensor in self._names:
                    self._names[sensor].corrupt(count)
                else:
                    raise ValueError("corrupt: sensor must be pms5003, bh1750 or bme280")
            else:
                raise ValueError(f"unknown fault {name!r}: use unplug, plug or corrupt")

    def _unplug(self, sensor: str) -> None:
        for uart_id in list(self.uarts):
            self._pump(uart_id)  # bytes already on the wire arrived
        self.unplugged.add(sensor)
        if sensor == "pms5003" and self.pms is not None:
            self.pms.power_off()

    def _plug(self, sensor: str) -> None:
        if sensor not in self.unplugged:
            return
        self.unplugged.discard(sensor)
        # Plugging in is a power-on: the part starts from its reset state.
        if sensor == "bh1750":
            self._names[sensor].power_on_reset()
        elif sensor == "bme280":
            self._names[sensor].soft_reset()
        elif sensor == "pms5003" and self.pms is not None:
            self.pms.power_on(warm=False)
            if self.pms_set_pin is not None and self.pins.get(self.pms_set_pin, 1) == 0:
                self.pms.set_pin_level(0)

    # -- chip reset, state, close -------------------------------------------------------------
    def reset(self) -> None:
        """ESP32 reset: its UART and I2S peripherals start over; the parts keep power."""
        with self._lock:
            for i2s_id in list(self.streams):
                self._close_stream(i2s_id)
            for uart_id in list(self.uarts):
                self._pump(uart_id)
            self.uarts.clear()
            if self.pms is not None:
                self.pms.listening = False
            self.pwm_state.clear()
            self.pins = {p: v for p, v in self.pins.items() if p == 0}

    def state(self) -> dict[str, Any]:
        with self._lock:
            lamp = self.pwm_state.get(self.lamp_pin) if self.lamp_pin is not None else None
            streams = list(self.streams.values())
            return {
                "lamp": self.lamp_level(),
                "lamp_pwm": ({"pin": self.lamp_pin, "freq": lamp[0], "duty_u16": lamp[1]}
                             if lamp else None),
                "pwm": {pin: {"freq": f, "duty_u16": d} for pin, (f, d) in self.pwm_state.items()},
                "pins": dict(self.pins),
                "unplugged": sorted(self.unplugged),
                "i2s_overruns": self._closed_overruns + sum(s.overruns for s in streams),
                "i2s_dropped_bytes": self._closed_dropped + sum(s.dropped_bytes for s in streams),
                "uart_dropped": {uid: p.dropped for uid, p in self.uarts.items()},
                "pms5003": ({"active": self.pms.active, "asleep": self.pms.asleep,
                             "warming_up": self.pms.warming_up()} if self.pms else None),
                "scenario": self.scenario.values(),
            }

    def close(self) -> None:
        with self._lock:
            for i2s_id in list(self.streams):
                self._close_stream(i2s_id)

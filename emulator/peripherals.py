"""The simulated parts on an emulated board's buses, and the wires between them.

The board core's bus handler calls one method per bus transaction (emulator/bus.py
frames, board side in board_side/emu_machine.py). This module routes each call to the
part at that address, UART or I2S port, as the pole is wired in boards.yaml, and
does what the silicon between them would do: NACK where nothing answers, the UART
driver's RX ring buffer filled at the line's pace, the I2S DMA buffer that drops
the oldest samples when the firmware falls behind (emulator/i2s.py).

The parts are the board's `sensors:`, built through the registry in devices/ and
known here only through their common interface (devices/base.py): routing goes by
bus, address and port, never by a part's name.

Wiring notes: the I2C parts answer on every controller id (the ESP32's GPIO matrix
can route I2C0 or I2C1 to the pole's SDA/SCL, and the board side does not send
pins); a UART part sits on the UART id and an I2S part on the I2S id that
boards.yaml gives (default 2 and 0). The supply-voltage divider (2:1) is on GPIO 35
unless the board's pins name `vbus_adc`.
"""

from __future__ import annotations

import errno
import logging
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any

from citynode.boards import Board

from .devices import DEVICES, SimulatedPart
from .devices.mic import Microphone
from .i2s import I2SStream
from .scenario import Scenario

log = logging.getLogger(__name__)

I2S_RX, I2S_TX = 0, 1            # on the bus (the board side maps the chip's I2S.RX=1, TX=2)
I2S_STEREO = 1
SUPPLY_ADC_PIN = 35
SUPPLY_DIVIDER = 0.5
ADC_FULL_SCALE_V = 3.3           # what board_side/emu_machine.py's read_uv assumes at 65535
UART_LOOKAHEAD = 0.05           # a waiting read looks this far ahead on the line
# A part holding SCL or SDA low (hung, or stretching the clock for ever): the ESP32
# port's I2C transfer (legacy driver, i2c_master_cmd_begin) gives up after
# 100 ms x (1 + bytes) and raises OSError(ETIMEDOUT); scan() probes 0x08..0x77 so.
I2C_STUCK_S_PER_BYTE = 0.1
I2C_SCAN_PROBES = 0x78 - 0x08
ESP_ETIMEDOUT = 116             # newlib's ETIMEDOUT on the chip (Linux's is 110)
DEFAULT_UART, DEFAULT_I2S = 2, 0  # a part's port when its boards.yaml entry names none


@dataclass
class UartPort:
    """One UART's driver state on the board: baud rate and RX ring buffer."""

    baudrate: int
    rxbuf: int
    buffer: bytearray = field(default_factory=bytearray)
    dropped: int = 0


@dataclass(frozen=True)
class UartWire:
    """A UART part on a UART id, and the baud rate the wiring is meant for."""

    part: Any                    # a uart part (devices/base.py)
    baud: int


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
        self.unplugged: set[str] = set()
        self.stuck: set[str] = set()                # I2C parts holding the bus
        self.pins: dict[int, int] = {0: 1}          # GPIO0 has the BOOT button's pull-up
        self.adc_overrides: dict[int, int] = {}
        self.pwm_state: dict[int, tuple[int, int]] = {}
        self.lamp_pin = board.pins.get("lamp_pwm")
        self.supply_pin = board.pins.get("vbus_adc", SUPPLY_ADC_PIN)

        self.parts: dict[str, SimulatedPart] = {}   # by name, in DEVICES' order
        self.i2c: dict[int, SimulatedPart] = {}     # by 7-bit address
        self.uart_wires: dict[int, UartWire] = {}   # by UART id
        self.i2s_parts: dict[int, SimulatedPart] = {}  # by I2S id
        self.control_pins: dict[int, SimulatedPart] = {}  # GPIO -> the part it drives
        self.uarts: dict[int, UartPort] = {}
        self.streams: dict[int, I2SStream] = {}
        self._closed_overruns = 0
        self._closed_dropped = 0
        for index, (name, cls) in enumerate(DEVICES.items()):
            spec = board.sensors.get(name)
            if spec is not None:
                self._wire(cls.attach(self, spec, seed + index + 1), spec)

    def _wire(self, part: SimulatedPart, spec: dict[str, Any]) -> None:
        """Connect a part where boards.yaml says: its address, UART or I2S id, control pin."""
        self.parts[part.name] = part
        if part.bus == "i2c":
            self.i2c[int(spec["address"])] = part
        elif part.bus == "uart":
            wire = UartWire(part, int(spec.get("baud", part.baud)))
            self.uart_wires[int(spec.get("uart", DEFAULT_UART))] = wire
        elif part.bus == "i2s":
            self.i2s_parts[int(spec.get("i2s", DEFAULT_I2S))] = part
        pin = self.board.pins.get(part.control_pin) if part.control_pin else None
        if pin is not None:
            self.control_pins[pin] = part

    def _plugged(self, part: SimulatedPart | None) -> bool:
        return part is not None and part.name not in self.unplugged

    # -- the physics each part sees (devices/base.py, World) --------------------------------
    def lamp_level(self) -> float:
        """The pole lamp's PWM duty, 0..1."""
        if self.lamp_pin is None:
            return 0.0
        if self.lamp_pin in self.pwm_state:
            return self.pwm_state[self.lamp_pin][1] / 65535
        return float(self.pins.get(self.lamp_pin, 0))

    def light(self, wall: float) -> float:
        t = self.scenario.at_wall(wall)
        return self.scenario.lux(t) + self.scenario.params.lamp_spill_lux * self.lamp_level()

    def weather(self, wall: float) -> tuple[float, float, float]:
        t = self.scenario.at_wall(wall)
        s = self.scenario
        return s.temperature(t), s.pressure(t), s.humidity(t)

    def air(self, wall: float) -> tuple[float, float, float]:
        return self.scenario.pm(self.scenario.at_wall(wall))

    # -- I2C ---------------------------------------------------------------------------------
    def _i2c_device(self, addr: int) -> Any:
        part = self.i2c.get(addr)
        if not self._plugged(part):
            raise OSError(errno.ENODEV, f"no ACK from I2C address 0x{addr:02x}")
        return part

    def _bus_held(self) -> bool:
        """A plugged part holds SCL/SDA low: every transaction on the bus times out."""
        return any(self._plugged(self.parts.get(name)) for name in self.stuck)

    def _time_out(self, seconds: float) -> None:
        """What the chip does on a held bus: wait its timeout (not holding the lock, as
        the other buses go on meanwhile), then OSError(ETIMEDOUT)."""
        self.scenario.clock.sleep(seconds)
        raise OSError(ESP_ETIMEDOUT, "I2C bus timeout: SCL or SDA held low")

    def i2c_scan(self, bus: int) -> list[int]:
        with self._lock:
            held = self._bus_held()
            if not held:
                return sorted(a for a, part in self.i2c.items() if self._plugged(part))
        # every probe times out: scan() skips them all and finds nothing
        self.scenario.clock.sleep(I2C_SCAN_PROBES * I2C_STUCK_S_PER_BYTE)
        return []

    def i2c_write(self, bus: int, addr: int, data: bytes) -> int:
        with self._lock:
            if not self._bus_held():
                return self._i2c_device(addr).write(bytes(data))
        self._time_out(I2C_STUCK_S_PER_BYTE * (1 + len(data)))

    def i2c_read(self, bus: int, addr: int, n: int) -> bytes:
        with self._lock:
            if not self._bus_held():
                return self._i2c_device(addr).read(n)
        self._time_out(I2C_STUCK_S_PER_BYTE * (1 + n))

    # -- UART --------------------------------------------------------------------------------
    def uart_init(self, uart_id: int, baudrate: int, rxbuf: int) -> None:
        with self._lock:
            self._pump(uart_id)  # what arrived before this init went to the old buffer
            self.uarts[uart_id] = UartPort(baudrate, max(1, rxbuf))
            wire = self.uart_wires.get(uart_id)
            if wire is not None:
                wire.part.take(self.scenario.wall())  # an uninitialised UART heard nothing
                wire.part.listening = True

    def _pump(self, uart_id: int, until: float | None = None) -> None:
        """Move the bytes that reached the RX pin by `until` into the driver's buffer."""
        port = self.uarts.get(uart_id)
        wire = self.uart_wires.get(uart_id)
        if wire is None:
            return
        data = wire.part.take(self.scenario.wall() if until is None else until)
        if port is None or not data or not self._plugged(wire.part):
            return
        if port.baudrate != wire.baud:  # wrong baud rate: framing garbage
            data = bytes((b * 0x9D + 0x5B) & 0xFF for b in data)
        room = port.rxbuf - len(port.buffer)
        port.buffer += data[:max(0, room)]
        port.dropped += max(0, len(data) - max(0, room))  # a full ring drops the newest

    def uart_write(self, uart_id: int, data: bytes) -> None:
        with self._lock:
            port = self.uarts.get(uart_id)
            wire = self.uart_wires.get(uart_id)
            if (wire is None or port is None or not self._plugged(wire.part)
                    or port.baudrate != wire.baud):
                return
            done = self.scenario.wall() + len(data) * 10 / port.baudrate
            self._pump(uart_id)
            wire.part.receive(bytes(data), done)

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
                wire = self.uart_wires.get(uart_id)
                if wire is not None and self._plugged(wire.part):
                    times = wire.part.arrivals(min(deadline, now + UART_LOOKAHEAD))
                    need = n - have
                    if len(times) >= need:
                        wake = min(deadline, times[need - 1])
            clock.sleep(max(0.0, min(wake - now, UART_LOOKAHEAD)) or 0.0005)

    # -- I2S ---------------------------------------------------------------------------------
    def i2s_open(self, i2s_id: int, mode: int, bits: int, fmt: int, rate: int,
                 ibuf: int) -> I2SStream:
        if mode != I2S_RX:
            raise OSError(errno.EINVAL, "only I2S RX: no I2S transmitter part is attached")
        if bits not in (16, 32) or not 8000 <= rate <= 96000:
            raise OSError(errno.EINVAL, "I2S: bits 16 or 32, rate 8000..96000")
        with self._lock:
            self._close_stream(i2s_id)
            part = self.i2s_parts.get(i2s_id)
            source = part.stream(rate) if part is not None else None
            stream = I2SStream(source, self.scenario.wall, rate, bits, fmt == I2S_STEREO, ibuf,
                               silent=lambda: not self._plugged(part))
            self.streams[i2s_id] = stream
            return stream

    def microphone(self, rate: int) -> Microphone:
        """A fresh sample stream from this board's microphone, starting now."""
        return self.parts["mic"].stream(rate)

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
            part = self.control_pins.get(pin)
            if part is not None:
                part.set_pin_level(self.pins[pin])

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
        """'unplug' / 'plug' (sensor=...), 'corrupt' (sensor=..., count=1, and what the
        part takes besides: kind='checksum'|'garbage' for the PMS5003), 'stuck' /
        'unstuck' (sensor=an I2C part: it holds the bus low, or lets it go)."""
        sensor = kw.pop("sensor", None)
        with self._lock:
            if name in ("stuck", "unstuck"):
                self._stick(sensor, name == "stuck")
            elif name in ("unplug", "plug"):
                part = self.parts.get(sensor)
                if part is None:
                    raise ValueError(f"{name}: sensor must be one of {', '.join(self.parts)}")
                if name == "unplug":
                    self._unplug(part)
                else:
                    self._plug(part)
            elif name == "corrupt":
                part = self.parts.get(sensor)
                if part is None or not part.corruptible:
                    names = [n for n, p in self.parts.items() if p.corruptible]
                    raise ValueError(f"corrupt: sensor must be {_one_of(names)}")
                part.corrupt(int(kw.pop("count", 1)), **kw)
            else:
                raise ValueError(f"unknown fault {name!r}: use unplug, plug, corrupt, stuck "
                                 "or unstuck")

    def _stick(self, sensor: str | None, stuck: bool) -> None:
        """A part that holds SCL/SDA low stays so through the chip's resets (it keeps its
        power); unplugging it (a power cycle) or 'unstuck' lets the bus go."""
        part = self.parts.get(sensor) if sensor is not None else None
        if part is None or part.bus != "i2c":
            names = [n for n, p in self.parts.items() if p.bus == "i2c"]
            raise ValueError(f"stuck: sensor must be {_one_of(names)}")
        if stuck:
            self.stuck.add(part.name)
        else:
            self.stuck.discard(part.name)

    def _unplug(self, part: SimulatedPart) -> None:
        for uart_id in list(self.uarts):
            self._pump(uart_id)  # bytes already on the wire arrived
        self.unplugged.add(part.name)
        self.stuck.discard(part.name)   # unpowered, it lets the bus go
        part.power_off()

    def _plug(self, part: SimulatedPart) -> None:
        if part.name not in self.unplugged:
            return
        self.unplugged.discard(part.name)
        part.power_on()  # plugging in is a power-on: the part starts from its reset state
        for pin, driven in self.control_pins.items():
            if driven is part and self.pins.get(pin, 1) == 0:
                part.set_pin_level(0)  # the firmware still holds its input low

    # -- chip reset, state, close -------------------------------------------------------------
    def reset(self) -> None:
        """ESP32 reset: its UART and I2S peripherals start over; the parts keep power."""
        with self._lock:
            for i2s_id in list(self.streams):
                self._close_stream(i2s_id)
            for uart_id in list(self.uarts):
                self._pump(uart_id)
            self.uarts.clear()
            for wire in self.uart_wires.values():
                wire.part.listening = False
            self.pwm_state.clear()
            self.pins = {p: v for p, v in self.pins.items() if p == 0}

    def state(self) -> dict[str, Any]:
        with self._lock:
            lamp = self.pwm_state.get(self.lamp_pin) if self.lamp_pin is not None else None
            streams = list(self.streams.values())
            parts = {name: s for name, part in self.parts.items()
                     if (s := part.state()) is not None}
            return {
                "lamp": self.lamp_level(),
                "lamp_pwm": ({"pin": self.lamp_pin, "freq": lamp[0], "duty_u16": lamp[1]}
                             if lamp else None),
                "pwm": {pin: {"freq": f, "duty_u16": d} for pin, (f, d) in self.pwm_state.items()},
                "pins": dict(self.pins),
                "unplugged": sorted(self.unplugged),
                "stuck": sorted(self.stuck),
                "i2s_overruns": self._closed_overruns + sum(s.overruns for s in streams),
                "i2s_dropped_bytes": self._closed_dropped + sum(s.dropped_bytes for s in streams),
                "uart_dropped": {uid: p.dropped for uid, p in self.uarts.items()},
                **parts,
                "scenario": self.scenario.values(),
            }

    def close(self) -> None:
        with self._lock:
            for i2s_id in list(self.streams):
                self._close_stream(i2s_id)


def _one_of(names: list[str]) -> str:
    """'a, b or c'."""
    return " or ".join(filter(None, (", ".join(names[:-1]), names[-1]))) if names else "none"

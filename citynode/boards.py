"""The board catalogue (boards.yaml): one loader and validator for every host program.

A bad entry fails at load time with the board, the key and the fix, so a typo in
the catalogue never surfaces later as a mysterious flashing or wiring fault.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from citynode.parts import PARTS

# boards.yaml at the top of the repository, shipped in the package (citynode/boards.yaml
# links to it), so an installed wheel reads the same catalogue as a checkout.
CATALOGUE = Path(str(resources.files("citynode") / "boards.yaml"))

CHIPS = ("esp32", "esp32s2", "esp32s3", "esp32c3", "esp32c6", "esp32h2")
RESET_CIRCUITS = ("devkitc", "usb-serial-jtag")
REQUIRED_PINS = ("i2c_sda", "i2c_scl", "uart_tx", "uart_rx", "i2s_sck", "i2s_ws", "i2s_sd")
PSRAM_TYPES = ("quad", "octal")
# Signals the chip only reads; every other pin drives (or, I2C, pulls) its line, which
# an input-only GPIO cannot.
INPUT_SIGNALS = frozenset({"uart_rx", "i2s_sd", "vbus_adc"})


@dataclass(frozen=True)
class ChipPins:
    """The GPIOs a chip has (its datasheet's pin list) and those that are input only."""

    gpios: frozenset[int]
    input_only: frozenset[int] = frozenset()


CHIP_PINS = {
    "esp32": ChipPins(frozenset([*range(0, 20), 21, 22, 23, 25, 26, 27, *range(32, 40)]),
                      frozenset(range(34, 40))),
    "esp32s2": ChipPins(frozenset([*range(0, 22), *range(26, 47)]), frozenset({46})),
    "esp32s3": ChipPins(frozenset([*range(0, 22), *range(26, 49)])),
    "esp32c3": ChipPins(frozenset(range(0, 22))),
    "esp32c6": ChipPins(frozenset(range(0, 31))),
    "esp32h2": ChipPins(frozenset([*range(0, 15), *range(22, 28)])),
}


class BoardCatalogueError(ValueError):
    """boards.yaml is missing, malformed, or names a board we do not know."""


CPU_MHZ = (20, 40, 80, 160, 240)      # what machine.freq() takes on the ESP32 port


@dataclass(frozen=True)
class ChipSpeed:
    """The chip's published MicroPython speed at its image's stock clock (issue 11):
    citynode/speed.py divides this host's rate on the same work by it."""

    pystones: float       # pystone_lowmem, pystones/s
    pi1000_s: float       # 1000 digits of pi (big integers), seconds
    gc_kb_ms: float       # a heap collection: KB of heap swept plus KB live, per ms
    mhz: int = 160        # the clock they are for: the image's, until machine.freq()

    def at(self, mhz: int) -> float:
        """How much faster the chip runs at `mhz` than at its stock clock: linear in the
        clock (flash-cache misses do not scale, so the chip may gain less)."""
        return mhz / self.mhz


@dataclass(frozen=True)
class Board:
    name: str
    description: str
    chip: str
    flash_size_mb: int
    firmware_offset: int
    heap_kb: int
    psram_mb: int
    reset_circuit: str
    usb: dict[str, Any]
    baud: int
    firmware_cache: str
    pins: dict[str, int]
    romfs_kb: int = 0
    sensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    speed: ChipSpeed | None = None
    reserved: dict[int, str] = field(default_factory=dict)  # GPIO -> what reserves it
    psram_type: str | None = None

    @property
    def flash_size(self) -> int:
        return self.flash_size_mb * 1024 * 1024

    @property
    def heap_bytes(self) -> int:
        return self.heap_kb * 1024


def _fail(board: str, key: str, problem: str, fix: str) -> BoardCatalogueError:
    return BoardCatalogueError(f"boards.yaml: board '{board}', key '{key}': {problem}; {fix}")


def _require_int(board: str, entry: dict, key: str, low: int, high: int) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(board, key, f"expected a whole number, got {value!r}",
                    f"write a number between {low} and {high}")
    if not low <= value <= high:
        raise _fail(board, key, f"{value} is out of range",
                    f"use a value between {low} and {high}")
    return value


def _require_choice(board: str, entry: dict, key: str, choices: tuple[str, ...]) -> str:
    value = entry.get(key)
    if value not in choices:
        raise _fail(board, key, f"{value!r} is not known", f"use one of: {', '.join(choices)}")
    return value


def _require_str(board: str, entry: dict, key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise _fail(board, key, "missing or empty", "add a text value")
    return value


def _gpio_keys(board: str, key: Any) -> list[int]:
    """A reserved: key: one GPIO (6) or an inclusive range ("6-11")."""
    if isinstance(key, int) and not isinstance(key, bool):
        return [key]
    low, sep, high = str(key).partition("-")
    if sep and low.strip().isdigit() and high.strip().isdigit():
        return list(range(int(low), int(high) + 1))
    raise _fail(board, f"reserved.{key}", "not a GPIO number or range",
                'write a number (0) or an inclusive range ("6-11")')


def _validate_reserved(board: str, chip: str, reserved: Any) -> dict[int, str]:
    """The GPIOs the board's own hardware takes (flash/PSRAM, the USB-UART bridge and USB,
    strapping pins, on-board LEDs), each with what takes it."""
    if not isinstance(reserved, dict) or not reserved:
        raise _fail(board, "reserved", "missing: the GPIOs the board itself uses",
                    'list them with what takes each, e.g. reserved: {"6-11": SPI flash, '
                    "0: strapping (BOOT button)}")
    out: dict[int, str] = {}
    for key, why in reserved.items():
        if not isinstance(why, str) or not why:
            raise _fail(board, f"reserved.{key}", "says nothing about what takes it",
                        "write what the GPIO is used for, e.g. SPI flash")
        for gpio in _gpio_keys(board, key):
            if gpio not in CHIP_PINS[chip].gpios:
                raise _fail(board, f"reserved.{key}", f"the {chip} has no GPIO {gpio}",
                            "check the chip's datasheet")
            out[gpio] = f"{out[gpio]}, {why}" if gpio in out else why
    return out


def _free_gpio(chip: str, reserved: dict[int, str], used: set[int], output: bool) -> str:
    """The lowest GPIO a signal could move to: on the chip, not reserved, not used, and
    able to drive its line if the signal is an output."""
    pins = CHIP_PINS[chip]
    for gpio in sorted(pins.gpios):
        if gpio in reserved or gpio in used or (output and gpio in pins.input_only):
            continue
        return f"GPIO {gpio}"
    return "none left: drop an optional signal (status_led, pms_set)"


def _validate_pins(board: str, pins: Any, chip: str,
                   reserved: dict[int, str]) -> dict[str, int]:
    if not isinstance(pins, dict):
        raise _fail(board, "pins", "expected a mapping of pin names to GPIO numbers",
                    "write e.g. pins: {i2c_sda: 21, i2c_scl: 22}")
    for name in REQUIRED_PINS:
        if name not in pins:
            raise _fail(board, f"pins.{name}", "missing",
                        "add the GPIO number the part is wired to")
    chip_pins = CHIP_PINS[chip]
    all_used = {g for g in pins.values() if isinstance(g, int)}
    used: dict[int, str] = {}
    for name, gpio in pins.items():
        if not isinstance(gpio, int) or not 0 <= gpio <= 48:
            raise _fail(board, f"pins.{name}", f"{gpio!r} is not a GPIO number",
                        "use a number between 0 and 48")
        if gpio in used:
            raise _fail(board, f"pins.{name}", f"GPIO {gpio} is already used by {used[gpio]}",
                        "give each signal its own GPIO")
        output = name not in INPUT_SIGNALS
        if gpio not in chip_pins.gpios:
            problem = f"the {chip} has no GPIO {gpio}"
        elif gpio in reserved:
            problem = f"GPIO {gpio} is reserved: {reserved[gpio]}"
        elif output and gpio in chip_pins.input_only:
            problem = f"GPIO {gpio} is input only and {name} drives its line"
        else:
            used[gpio] = name
            continue
        raise _fail(board, f"pins.{name}", problem,
                    f"use a free GPIO, e.g. {_free_gpio(chip, reserved, all_used, output)}")
    return dict(pins)


def _validate_psram(board: str, entry: dict, psram_mb: int) -> str | None:
    """quad or octal PSRAM, and a MicroPython image built for it: the octal image
    (SPIRAM_OCT) on a quad module finds no PSRAM and takes GPIO33-37 for nothing."""
    kind = entry.get("psram_type")
    if psram_mb and kind not in PSRAM_TYPES:
        raise _fail(board, "psram_type", f"{kind!r} is not known",
                    f"write the module's PSRAM interface: {' or '.join(PSRAM_TYPES)}")
    image = str(entry.get("firmware_cache", ""))
    if "SPIRAM_OCT" in image and kind != "octal":
        raise _fail(board, "firmware_cache", f"{image} is the octal-PSRAM image and the "
                    f"module's PSRAM is {kind or 'absent'}",
                    "use the image without SPIRAM_OCT (e.g. ESP32_GENERIC_S3-v1.28.0.bin)")
    return kind if psram_mb else None


def _validate_sensors(board: str, sensors: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(sensors, dict):
        raise _fail(board, "sensors", "expected a mapping", "write e.g. sensors: {bh1750: {...}}")
    for name, spec in sensors.items():
        if name not in PARTS:
            raise _fail(board, f"sensors.{name}", "unknown sensor",
                        f"use one of: {', '.join(PARTS)} (citynode/parts.py)")
        bus = PARTS[name].bus
        if not isinstance(spec, dict) or spec.get("bus") != bus:
            raise _fail(board, f"sensors.{name}.bus", f"{name} sits on the {bus} bus",
                        f"write bus: {bus}")
        if bus == "i2c" and not isinstance(spec.get("address"), int):
            raise _fail(board, f"sensors.{name}.address", "missing I2C address",
                        "write the 7-bit address, e.g. 0x23")
    return dict(sensors)


def _validate_speed(board: str, speed: Any) -> ChipSpeed | None:
    """Optional; when present both figures, positive and of a chip's order (a pystones
    figure of 70000 is a host's, not a chip's)."""
    if speed is None:
        return None
    if not isinstance(speed, dict):
        raise _fail(board, "speed", "expected a mapping",
                    "write e.g. speed: {pystones: 1107, pi1000_s: 0.855, gc_kb_ms: 29}")
    limits = {"pystones": (50, 50_000), "pi1000_s": (0.01, 100), "gc_kb_ms": (1, 1000)}
    values = {}
    for key, (low, high) in limits.items():
        value = speed.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not low <= value <= high:
            raise _fail(board, f"speed.{key}", f"{value!r} is not a chip's figure",
                        f"write the published figure, between {low} and {high}")
        values[key] = float(value)
    mhz = speed.get("mhz", 160)
    if mhz not in CPU_MHZ:
        raise _fail(board, "speed.mhz", f"{mhz!r} is not an ESP32 clock",
                    "write the stock image's CPU clock in MHz: one of "
                    + ", ".join(map(str, CPU_MHZ)))
    return ChipSpeed(**values, mhz=mhz)


def _board_from_entry(name: str, entry: Any) -> Board:
    if not isinstance(entry, dict):
        raise _fail(name, "(entry)", "expected a mapping of keys", "see esp32-devkitc for a model")
    chip = _require_choice(name, entry, "chip", CHIPS)
    psram_mb = _require_int(name, entry, "psram_mb", 0, 32)
    reserved = _validate_reserved(name, chip, entry.get("reserved"))
    return Board(
        name=name,
        description=str(entry.get("description", name)),
        chip=chip,
        flash_size_mb=_require_int(name, entry, "flash_size_mb", 1, 32),
        firmware_offset=_require_int(name, entry, "firmware_offset", 0, 0x10000),
        heap_kb=_require_int(name, entry, "heap_kb", 32, 16384),
        psram_mb=psram_mb,
        reset_circuit=_require_choice(name, entry, "reset_circuit", RESET_CIRCUITS),
        usb=dict(entry.get("usb") or {}),
        baud=_require_int(name, entry, "baud", 9600, 2_000_000),
        firmware_cache=_require_str(name, entry, "firmware_cache"),
        romfs_kb=_require_int(name, {"romfs_kb": 0, **entry}, "romfs_kb", 0, 1024),
        pins=_validate_pins(name, entry.get("pins"), chip, reserved),
        sensors=_validate_sensors(name, entry.get("sensors", {})),
        speed=_validate_speed(name, entry.get("speed")),
        reserved=reserved,
        psram_type=_validate_psram(name, entry, psram_mb),
    )


def parse_catalogue(text: str) -> dict[str, Board]:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BoardCatalogueError(f"boards.yaml is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("boards"), dict):
        raise BoardCatalogueError("boards.yaml: expected a top-level 'boards:' mapping")
    return {name: _board_from_entry(name, entry) for name, entry in doc["boards"].items()}


def load_catalogue(path: Path = CATALOGUE) -> dict[str, Board]:
    try:
        text = path.read_text()
    except OSError as exc:
        fix = ("reinstall citynode (the catalogue ships inside the package)" if path == CATALOGUE
               else "check the path, or leave the option out to use the catalogue shipped "
                    "with citynode")
        raise BoardCatalogueError(
            f"cannot read the board catalogue {path}: {exc.strerror}; {fix}") from exc
    return parse_catalogue(text)


def get_board(name: str, path: Path = CATALOGUE) -> Board:
    boards = load_catalogue(path)
    if name not in boards:
        raise BoardCatalogueError(
            f"unknown board '{name}'; known boards: {', '.join(sorted(boards))} (see boards.yaml)")
    return boards[name]

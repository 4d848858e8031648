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


class BoardCatalogueError(ValueError):
    """boards.yaml is missing, malformed, or names a board we do not know."""


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
    sensors: dict[str, dict[str, Any]] = field(default_factory=dict)

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


def _validate_pins(board: str, pins: Any) -> dict[str, int]:
    if not isinstance(pins, dict):
        raise _fail(board, "pins", "expected a mapping of pin names to GPIO numbers",
                    "write e.g. pins: {i2c_sda: 21, i2c_scl: 22}")
    for name in REQUIRED_PINS:
        if name not in pins:
            raise _fail(board, f"pins.{name}", "missing",
                        "add the GPIO number the part is wired to")
    used: dict[int, str] = {}
    for name, gpio in pins.items():
        if not isinstance(gpio, int) or not 0 <= gpio <= 48:
            raise _fail(board, f"pins.{name}", f"{gpio!r} is not a GPIO number",
                        "use a number between 0 and 48")
        if gpio in used:
            raise _fail(board, f"pins.{name}", f"GPIO {gpio} is already used by {used[gpio]}",
                        "give each signal its own GPIO")
        used[gpio] = name
    return dict(pins)


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


def _board_from_entry(name: str, entry: Any) -> Board:
    if not isinstance(entry, dict):
        raise _fail(name, "(entry)", "expected a mapping of keys", "see esp32-devkitc for a model")
    return Board(
        name=name,
        description=str(entry.get("description", name)),
        chip=_require_choice(name, entry, "chip", CHIPS),
        flash_size_mb=_require_int(name, entry, "flash_size_mb", 1, 32),
        firmware_offset=_require_int(name, entry, "firmware_offset", 0, 0x10000),
        heap_kb=_require_int(name, entry, "heap_kb", 32, 16384),
        psram_mb=_require_int(name, entry, "psram_mb", 0, 32),
        reset_circuit=_require_choice(name, entry, "reset_circuit", RESET_CIRCUITS),
        usb=dict(entry.get("usb") or {}),
        baud=_require_int(name, entry, "baud", 9600, 2_000_000),
        firmware_cache=_require_str(name, entry, "firmware_cache"),
        pins=_validate_pins(name, entry.get("pins")),
        sensors=_validate_sensors(name, entry.get("sensors", {})),
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

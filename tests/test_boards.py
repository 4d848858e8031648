"""The board catalogue: every entry loads, and a bad one says what to fix."""

from __future__ import annotations

import pytest
import yaml

from citynode.boards import (
    CATALOGUE,
    BoardCatalogueError,
    get_board,
    load_catalogue,
    parse_catalogue,
)


def _with(board: str, **changes) -> str:
    doc = yaml.safe_load(CATALOGUE.read_text())
    doc["boards"][board].update(changes)
    return yaml.safe_dump(doc)


def test_catalogue_has_the_boards_we_support():
    boards = load_catalogue()
    expected = {"esp32-devkitc", "esp32-wrover-kit", "esp32-s3-devkitc", "esp32-c3-devkitm"}
    assert expected <= set(boards)
    devkitc = boards["esp32-devkitc"]
    assert (devkitc.chip, devkitc.flash_size_mb, devkitc.firmware_offset) == ("esp32", 4, 0x1000)
    assert devkitc.heap_kb == 110 and devkitc.psram_mb == 0
    assert devkitc.sensors["bh1750"]["address"] == 0x23


@pytest.mark.parametrize("changes, words", [
    ({"chip": "esp33"}, ["esp32-devkitc", "'chip'", "use one of"]),
    ({"heap_kb": "lots"}, ["esp32-devkitc", "'heap_kb'", "whole number"]),
    ({"firmware_offset": 0x20000}, ["'firmware_offset'", "out of range"]),
    ({"pins": {"i2c_sda": 21}}, ["pins.i2c_scl", "missing"]),
    ({"pins": {"i2c_sda": 21, "i2c_scl": 21, "uart_tx": 1, "uart_rx": 3, "i2s_sck": 4,
               "i2s_ws": 5, "i2s_sd": 6}}, ["pins.i2c_s", "GPIO 21 is already used by i2c_s"]),
    ({"sensors": {"bh1750": {"bus": "uart"}}}, ["sensors.bh1750.bus", "write bus: i2c"]),
])
def test_bad_entries_name_the_board_the_key_and_the_fix(changes, words):
    with pytest.raises(BoardCatalogueError) as err:
        parse_catalogue(_with("esp32-devkitc", **changes))
    for word in words:
        assert word in str(err.value)


def test_unknown_board_lists_the_known_ones():
    with pytest.raises(BoardCatalogueError, match="esp32-devkitc"):
        get_board("esp8266-nodemcu")


def test_every_board_has_its_chip_speed():
    for board in load_catalogue().values():
        assert board.speed is not None, board.name
        assert 100 < board.speed.pystones < 10_000 and 0.1 < board.speed.pi1000_s < 10
        assert 1 < board.speed.gc_kb_ms < 1000


@pytest.mark.parametrize("speed, words", [
    ({"pystones": 70000, "pi1000_s": 0.855}, ["speed.pystones", "not a chip's figure"]),
    ({"pystones": 1107}, ["speed.pi1000_s", "between"]),
    ("fast", ["'speed'", "expected a mapping"]),
    ({"pystones": 1107, "pi1000_s": 0.855}, ["speed.gc_kb_ms", "between"]),
    ({"pystones": 1107, "pi1000_s": 0.855, "gc_kb_ms": 29, "mhz": 100}, ["speed.mhz", "160, 240"]),
])
def test_bad_speed_names_the_key(speed, words):
    with pytest.raises(BoardCatalogueError) as err:
        parse_catalogue(_with("esp32-devkitc", speed=speed))
    for word in words:
        assert word in str(err.value)


def test_speed_factors_are_host_over_chip():
    from citynode.speed import HostRates, factors

    rates = HostRates(pystones=110700, pi1000_s=0.00855, binary="mp", cpu="x", measured_at=0)
    f = factors(get_board("esp32-devkitc"), rates)
    assert f.interp == pytest.approx(100) and f.bigint == pytest.approx(100)
    assert f.chip_ms(2.0) == pytest.approx(200)
    fast = factors(get_board("esp32-devkitc"), rates, mhz=240)     # machine.freq(240 MHz)
    assert fast.interp == pytest.approx(100 * 160 / 240)


# --- pins the board itself uses (issue 11) -------------------------------------------

def _refusal(board: str, **changes) -> str:
    with pytest.raises(BoardCatalogueError) as err:
        parse_catalogue(_with(board, **changes))
    return str(err.value)


def _pins(board: str, **moved) -> dict:
    return {**load_catalogue()[board].pins, **moved}


@pytest.mark.parametrize("board, moved, key, why", [
    # the wiring these boards had: the PMS5003 on UART0 (the USB bridge and the REPL) and
    # the lamp on a strapping pin that drives the on-board LED; the WROVER's PSRAM pins
    ("esp32-c3-devkitm", {"uart_tx": 21}, "pins.uart_tx", "UART0 TX (USB bridge, REPL)"),
    ("esp32-c3-devkitm", {"uart_rx": 20}, "pins.uart_rx", "UART0 RX (USB bridge, REPL)"),
    ("esp32-c3-devkitm", {"lamp_pwm": 8}, "pins.lamp_pwm", "strapping, RGB LED (WS2812)"),
    ("esp32-wrover-kit", {"uart_tx": 17}, "pins.uart_tx", "PSRAM (WROVER-E)"),
    ("esp32-wrover-kit", {"uart_rx": 16}, "pins.uart_rx", "PSRAM (WROVER-E)"),
    ("esp32-s3-devkitc", {"status_led": 48}, "pins.status_led", "RGB LED (DevKitC-1 v1.0)"),
    ("esp32-devkitc", {"lamp_pwm": 7}, "pins.lamp_pwm", "SPI flash (WROOM-32E)"),
    ("esp32-devkitc", {"status_led": 2}, "pins.status_led", "strapping"),
])
def test_a_signal_on_a_reserved_pin_is_refused_with_a_free_one(board, moved, key, why):
    message = _refusal(board, pins=_pins(board, **moved))
    gpio = next(iter(moved.values()))
    assert f"'{key}'" in message and f"GPIO {gpio} is reserved: {why}" in message
    suggested = int(message.rsplit("e.g. GPIO ", 1)[1])
    catalogue = load_catalogue()[board]
    assert suggested not in catalogue.reserved
    assert suggested not in _pins(board, **moved).values()
    parse_catalogue(_with(board, pins=_pins(board, **{next(iter(moved)): suggested})))


def test_a_pin_the_chip_lacks_or_cannot_drive_is_refused():
    assert "the esp32 has no GPIO 24" in _refusal("esp32-devkitc",
                                                  pins=_pins("esp32-devkitc", lamp_pwm=24))
    message = _refusal("esp32-devkitc", pins=_pins("esp32-devkitc", uart_tx=34))
    assert "GPIO 34 is input only and uart_tx drives its line" in message
    assert "e.g. GPIO 13" in message                   # not 34..39, not reserved, not used
    parse_catalogue(_with("esp32-devkitc", pins=_pins("esp32-devkitc", uart_rx=34,
                                                       i2s_sd=35)))   # inputs may


def test_every_board_lists_what_it_reserves():
    for name, board in load_catalogue().items():
        assert board.reserved, name
        assert not set(board.pins.values()) & set(board.reserved), name
    assert "'reserved'" in _refusal("esp32-devkitc", reserved=None)
    assert "the esp32 has no GPIO 40" in _refusal("esp32-devkitc", reserved={"38-40": "x"})


def test_the_s3_gets_the_image_for_its_quad_psram():
    s3 = load_catalogue()["esp32-s3-devkitc"]
    assert (s3.psram_type, s3.firmware_cache) == ("quad", "ESP32_GENERIC_S3-v1.28.0.bin")
    assert not {33, 34, 35, 36, 37} & set(s3.reserved)  # octal PSRAM's pins: not on N8R2
    message = _refusal("esp32-s3-devkitc",
                       firmware_cache="ESP32_GENERIC_S3-SPIRAM_OCT-v1.28.0.bin")
    assert "'firmware_cache'" in message and "octal-PSRAM image" in message
    assert "'psram_type'" in _refusal("esp32-wrover-kit", psram_type=None)

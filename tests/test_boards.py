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

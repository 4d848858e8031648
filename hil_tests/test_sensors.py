"""Every part reads something physical; on the emulated board, what the world holds."""

from __future__ import annotations

import pytest

from citynode import wire
from hil_tests.bench import Bench, records

# what the parts can report at all (datasheet ranges), by quantity
PHYSICAL = {
    "light/lux": (0, 65535 * 1.2 / 0.5),     # BH1750: 16-bit count, finest mode
    "env/temperature": (-40, 85),            # BME280 operating range, degC
    "env/humidity": (0, 100),                # %RH
    "env/pressure": (30000, 110000),         # Pa
    "air/pm1_0": (0, 1000), "air/pm2_5": (0, 1000), "air/pm10": (0, 1000),  # ug/m3
    "noise/laeq": (20, 130), "noise/lamax": (20, 140), "noise/l90": (20, 130),  # dBA
}


def _out_of_range(readings: dict) -> dict:
    return {name: value for name, value in readings.items()
            if name in PHYSICAL and not PHYSICAL[name][0] <= value <= PHYSICAL[name][1]}


@pytest.fixture(scope="session")
def sampled(bench: Bench) -> tuple[dict, dict | None]:
    """One self-test with every part read (the PMS5003's fan spun up), and the
    emulated world at that moment. Session-scoped: the xdist worker may run another
    module's tests between this module's, and a module fixture would be made twice
    (30 s each)."""
    report = bench.selftest(warmup_s=40)["sensors"]
    world = (bench.emulated.control("status")["peripherals"]["scenario"]
             if bench.emulated is not None else None)
    return report, world


def test_every_sensor_reads_within_its_physical_range(sampled):
    report, _ = sampled
    failing = {name: part.get("error", part["status"]) for name, part in report.items()
               if part["status"] != "ok"}
    assert not failing, f"sensors that did not read: {failing}"
    readings = {n: v for part in report.values() for n, v in part["readings"].items()}
    assert {"light/lux", "env/temperature", "air/pm2_5"} <= set(readings), readings
    assert not _out_of_range(readings), f"out of physical range: {_out_of_range(readings)}"


def test_readings_match_the_emulated_world(bench: Bench, sampled):
    bench.require_emulator("compares readings with the simulated scenario")
    report, world = sampled
    readings = {n: v for part in report.values() for n, v in part["readings"].items()}
    assert readings["light/lux"] == pytest.approx(world["lux"], rel=0.05, abs=1)
    assert readings["env/temperature"] == pytest.approx(world["temperature"], abs=0.3)
    assert readings["env/humidity"] == pytest.approx(world["humidity"], abs=2)
    assert readings["env/pressure"] == pytest.approx(world["pressure"], abs=50)
    assert readings["air/pm2_5"] == pytest.approx(world["pm25"], rel=0.15, abs=2)


def test_the_window_carries_sound_levels_within_range(node: Bench):
    check_sound_window(node)


WINDOW_CLOSE = """
import asyncio, json
from node import app, config
cfg = config.load()
cfg["wdt_ms"] = 3600000         # no supervisor here to feed the dog as the app would
n = app.Node(cfg)
closed = []
seal = n._seal
async def kept(kind, records, *rest, **kw):
    closed.extend(records)
    return await seal(kind, records, *rest, **kw)
n._seal = kept
async def read_late():         # its first step: at the close's first yield
    n.window.add("light/lux", "lx", 7.0)
async def main():
    asyncio.create_task(n.signer.run())
    n.window.add("light/lux", "lx", 5.0)
    asyncio.create_task(read_late())
    await n.close_window()
    lux = n.window.stats.get("light/lux")
    print(json.dumps([[r[2] for r in closed if r[0] == "light/lux"], lux.n if lux else 0]))
asyncio.run(main())
"""


def test_a_reading_taken_while_the_window_closes_counts_in_the_next(bench: Bench):
    # The close yields to the loop between its pieces (at chip speed they held it up to
    # ~70 ms in one). A sensor's reading in such a yield belongs to the next window: put
    # into the closing one after its records were taken, it would be lost.
    closed, later = bench.exec_json(WINDOW_CLOSE, timeout=120)
    assert closed == [5.0] and later == 1, (closed, later)


def check_sound_window(node: Bench, timeout: float | None = None) -> dict:
    """A window's sound levels are ordered, physical and the world's; returns its
    records. Shared with the chip-speed suite (test_chip_speed.py)."""
    with node.listen() as sub:
        body = sub.wait(1, timeout=timeout or 3 * node.window_s + 20,
                        kind=wire.KIND_READINGS)[0]
    values = records(body)
    assert values["noise/l90"] <= values["noise/laeq"] <= values["noise/lamax"]
    assert not _out_of_range(values), f"out of physical range: {_out_of_range(values)}"
    if node.emulated is not None:
        world = node.emulated.control("status")["peripherals"]["scenario"]
        assert values["noise/laeq"] == pytest.approx(world["noise_dba"], abs=3)
    return values

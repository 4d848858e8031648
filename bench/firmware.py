"""Firmware benchmark on the emulated board (esp32-devkitc, the node's real code).

    python -m bench.firmware --out bench/results      # or: make bench-firmware

One run, one board: the crypto and DSP micro-benchmarks (bench/firmware_crypto.py,
bench/firmware_dsp.py) executed on the board through mpremote, then the node app
itself against a real Mosquitto: the time of one full sample -> aggregate -> encode
-> sign -> send cycle (until the broker's PUBACK), and the heap high-water while
every sensor and the microphone run (live bytes, sampled after a collection every
50 ms, module footprint included). Heap figures are given in the chip's terms:
the emulated VM counts 64-bit bytes, twice the ESP32's (emulator/vm.py WORD_SCALE).
Writes bench/results/firmware.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench import firmware_crypto, firmware_dsp
from bench.output import save
from citynode.emulator.vm import WORD_SCALE
from citynode.mosquitto import Mosquitto
from citynode.provisioning.device import last_json
from citynode.testing.emulator import mpremote, start_node

CYCLE = """
import asyncio, gc, json, time
from node import app, config
n = app.Node(config.load())
async def cycle():
    for s in n.sensors:
        for name, unit, value in await s.sample():
            n.window.add(name, unit, value)
    await n.uplink.send(n.close_window())
    while len(n.uplink.spool):
        await asyncio.sleep_ms(1)
async def main():
    asyncio.create_task(n.wifi.run())
    asyncio.create_task(n.uplink.run())
    while not n.uplink.connected:
        await asyncio.sleep_ms(50)
    times = []
    for i in range(RUNS):
        t = time.ticks_us()
        await cycle()
        times.append(time.ticks_diff(time.ticks_us(), t) / 1000)
    times.sort()
    print(json.dumps({"cycle_ms": times[len(times) // 2], "published": n.uplink.published}))
asyncio.run(main())
"""

HIGH_WATER = """
import asyncio, gc, json, time
gc.collect()
base = gc.mem_alloc()
from node import app, config
n = app.Node(config.load())
peak = [0]
async def sampler():
    # live data only: collect first (mem_alloc alone counts garbage not yet collected)
    while True:
        gc.collect()
        used = gc.mem_alloc() - base
        if used > peak[0]:
            peak[0] = used
        await asyncio.sleep_ms(50)
async def main():
    asyncio.create_task(sampler())
    task = asyncio.create_task(n.run())
    await asyncio.sleep_ms(SECONDS * 1000)
    gc.collect()
    print(json.dumps({"peak_bytes": peak[0], "after_gc_bytes": gc.mem_alloc() - base,
                      "published": n.uplink.published}))
asyncio.run(main())
"""


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="cn-bench-fw-") as tmp, \
            Mosquitto(Path(tmp) / "broker") as broker:
        emu, board, _device, _key = start_node(Path(tmp), broker, window_s=3600)
        try:
            crypto = last_json(mpremote(board.link, "exec", firmware_crypto.SCRIPT.replace(
                "HEAP", "110"), timeout=600))
            dsp_code = (f"PLAIN_SRC = {firmware_dsp.plain_kernel_source()!r}\n"
                        + firmware_dsp.BENCH)
            dsp = last_json(mpremote(board.link, "exec", dsp_code, timeout=900))
            cycle = last_json(mpremote(board.link, "exec", CYCLE.replace("RUNS", "20"),
                                        timeout=300))
            mpremote(board.link, "soft-reset")
            water = last_json(mpremote(board.link, "exec", HIGH_WATER.replace("SECONDS", "20"),
                                        timeout=300))
        finally:
            emu.stop()
    return {
        "es256_sign_ms": round(crypto["es256_sign_ms"], 2),
        "hmac_sign_ms": round(crypto["hmac_sign_ms"], 3),
        "dsp_realtime_factor_48k": dsp["dsp_realtime_factor_48k"],
        "dsp_plain_python_realtime_factor_48k": dsp["dsp_plain_python_realtime_factor_48k"],
        "cycle_ms": round(cycle["cycle_ms"], 1),
        "heap_high_water_kb": round(water["peak_bytes"] / WORD_SCALE / 1024, 1),
        "heap_high_water_kb_x64": round(water["peak_bytes"] / 1024, 1),
        "p256_table_bytes": crypto["table_bytes"],
        "board": "esp32-devkitc (emulated, MicroPython unix port on x86-64)",
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory for firmware.json")
    args = parser.parse_args(argv)
    result = run()
    save(result, args.out, "firmware")
    return result


if __name__ == "__main__":
    main()

"""Signed updates through one pole's gateway at the chip's speed (issue 15).

    python -m bench.ota --out bench/results          # or: make bench-ota (~12 min)
    python -m bench.ota --quick                      # the smoke run of `make test`

NODES emulated WROVER kits (a stock image, the app as .mpy files: a devkitc's ROMFS
app has no update path yet, docs/ota.md), provisioned through the real
`citynode-provision`, then started again at the chip's speed (`citynode-emu
--chip-speed`); the pole's broker, the real gateway (with its quota for update chunks)
and a city broker, where `citynode-ops ota` reaches the nodes as an operator does. Two
rollouts of the firmware as a newer version (`citynode-ops bundle`): to one node, then
to every node (the first one again, newer still).

Per rollout: seconds until every node took the whole bundle (its answer to `ota_finish`
at the city), until every node's trial boot sent a window of the new version, and until
every node committed (a commit waits for HEALTHY_S = 120 s of the trial boot); bytes on
air per node (MQTT payloads to and from the node on the pole's broker while the rollout
ran: the signed commands and their answers, no MQTT or radio framing) against the
bundle's size; the I2S ring's overruns while it ran (the emulator's DMA model); and the
readings: windows lost (published on the pole's broker, never at the city, plus what
the node's spool dropped), the p95 delay of the windows at the city (against their
close, by the node's synced clock) during the rollout and before it, and the longest
gap between two windows (the reset into the trial boot).

The smoke run: one node at host speed, windows of 5 s, until its trial boot's first
window (no commit wait). Writes bench/results/ota.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

from bench.output import save
from citynode import wire
from citynode.chrony import PoleTimeServer
from citynode.mosquitto import Mosquitto
from citynode.ops.bundle import split
from citynode.subscriber import Message, Subscriber
from citynode.testing.emulator import FIRMWARE, VENV_BIN, BoardHandle, start_emulator
from citynode.testing.gateway import PREFIX as CITY_PREFIX
from citynode.testing.gateway import GatewayProcess
from citynode.testing.provisioning import ops_init, provision_boards

BOARD = "esp32-wrover-kit"
POLE = "B-1"
NODES = 10
TARGETS = {"readings_lost": 0}
TRIAL_WINDOW_S = 120        # the longest wait for a trial boot's first window


@dataclass
class Seen:
    """What one node sent and was sent while a rollout ran."""
    down_bytes: int = 0             # commands to it, on the pole's broker
    answer_bytes: int = 0           # its answers (status envelopes), same broker
    at_pole: set[int] = field(default_factory=set)      # its windows' sequence numbers
    at_city: list[tuple[float, wire.Payload]] = field(default_factory=list)


class Watch:
    """Every node's traffic on the pole's broker and, through the gateway, the city's."""

    def __init__(self, pole: Mosquitto, city: Mosquitto, devices: list[str]):
        self.nodes = {d: Seen() for d in devices}
        self.lock = threading.Lock()
        self.pole = Subscriber(pole.host, pole.port, topic="#", on_message=self._pole)
        self.city = Subscriber(city.host, city.port, topic=f"{CITY_PREFIX}/+/up/+",
                               on_message=self._city)

    def _pole(self, message: Message) -> None:
        device = message.topic.rsplit("/", 1)[-1]
        seen = self.nodes.get(device)
        if seen is None:
            return
        with self.lock:
            if message.topic == wire.down_topic(device):
                seen.down_bytes += len(message.payload)
                return
            payload = _payload(message.payload)
            if payload is None:
                return
            if payload.kind == wire.KIND_READINGS:
                seen.at_pole.add(payload.seq)
            elif payload.kind == wire.KIND_STATUS:
                seen.answer_bytes += len(message.payload)

    def _city(self, message: Message) -> None:
        payload = _payload(message.payload)
        if payload is not None and payload.device in self.nodes:
            with self.lock:
                self.nodes[payload.device].at_city.append((time.time(), payload))

    def reset(self) -> None:
        with self.lock:
            self.nodes = {d: Seen() for d in self.nodes}

    def first(self, device: str, since: float, test) -> float | None:
        """When the first envelope from `device` after `since` for which test(records)
        holds reached the city."""
        with self.lock:
            return next((at for at, p in self.nodes[device].at_city
                         if at >= since and test(p.kind, _records(p))), None)

    def close(self) -> None:
        self.pole.close()
        self.city.close()


def _payload(data: bytes) -> wire.Payload | None:
    try:
        return wire.decode_payload(wire.decode_envelope(data))
    except Exception:  # noqa: BLE001 - anything undecodable is no node's window
        return None


def _records(payload: wire.Payload) -> dict:
    return {r[0]: r.get(2, r.get(3)) for r in payload.records}


def build_bundle(tmp: Path, home: Path, version: str) -> Path:
    """The firmware as `version`, bundled by `citynode-ops bundle` for the emulated VM."""
    fw = tmp / f"fw-{version}"
    shutil.copytree(FIRMWARE, fw, ignore=shutil.ignore_patterns("__pycache__"))
    version_py = fw / "node" / "version.py"
    text = version_py.read_text()
    version_py.write_text(text.replace('VERSION = "0.1.0"', f'VERSION = "{version}"'))
    out = tmp / f"citynode-{version}.cbor"
    _ops(home, "bundle", "--board", BOARD, "--arch", "x64", "--firmware", str(fw),
         "--out", str(out))
    return out


def _ops(home: Path, *args: str, timeout: float = 1800) -> dict:
    run = subprocess.run([str(VENV_BIN / "citynode-ops"), "--home", str(home), *args,
                          "--json"], capture_output=True, text=True, timeout=timeout)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"citynode-ops {args[0]} said nothing:\n{run.stderr}")
    return json.loads(lines[-1])["result"]


def rollout(home: Path, bundle: Path, version: str, devices: list[str],
            boards: list[BoardHandle], watch: Watch, trial_wait_s: float) -> dict:
    """One `citynode-ops ota` to `devices` (the first a canary when there are more), and
    what it cost them."""
    overruns = [_overruns(b) for b in boards]
    watch.reset()
    start = time.time()
    targets = [a for d in devices for a in ("--device", d)]
    canary = ["--canary", "1"] if len(devices) > 1 else []
    result = _ops(home, "ota", "--bundle", str(bundle), *targets, *canary, "--wait", "60",
                  "--trial-wait", str(trial_wait_s))
    took = time.time() - start
    states = {n["device"]: n for n in result["nodes"]}

    def per_node(test) -> float | None:
        times = [watch.first(d, start, test) for d in devices]
        return None if None in times else round(max(times) - start, 1)

    def new_window(kind: int, records: dict) -> bool:
        return kind == wire.KIND_READINGS and records.get("node/firmware") == version

    deadline = time.monotonic() + TRIAL_WINDOW_S    # the smoke run does not wait for commits
    while per_node(new_window) is None and time.monotonic() < deadline:
        time.sleep(0.5)

    with watch.lock:
        seen = dict(watch.nodes)
    lost = sum(len(s.at_pole - {p.seq for _, p in s.at_city if p.kind == wire.KIND_READINGS})
               + _dropped(s) for s in seen.values())
    windows = [(at, p) for s in seen.values() for at, p in s.at_city
               if p.kind == wire.KIND_READINGS]
    return {
        "nodes": len(devices),
        "committed": sum(n["state"] == "committed" for n in states.values()),
        "states": sorted({n["state"] for n in states.values()}),
        "took_whole_bundle_s": per_node(lambda kind, r: "cmd/ota_finish" in r),
        "first_trial_window_s": per_node(new_window),
        "committed_s": per_node(lambda kind, r: "ota/committed" in r),
        "ops_s": round(took, 1),
        "bytes_on_air_per_node": round(sum(s.down_bytes + s.answer_bytes
                                           for s in seen.values()) / len(devices)),
        "bundle_bytes_sent_per_node": round(sum(n["sent"] for n in states.values())
                                            / len(devices)),
        "audio_overruns": sum(_overruns(b) - o for b, o in zip(boards, overruns, strict=True)),
        "readings_lost": lost,
        "windows_at_city": len(windows),
        "window_delay_ms_p95": _p95([(at - p.time_ms / 1000) * 1000 for at, p in windows
                                     if p.time_ms is not None]),
        "longest_window_gap_s": _longest_gap(seen),
    }


def _dropped(seen: Seen) -> int:
    """Windows the node's spool dropped while the rollout ran (node/dropped rises)."""
    counts = [_records(p).get("node/dropped") for _, p in seen.at_city
              if p.kind == wire.KIND_READINGS]
    counts = [c for c in counts if isinstance(c, int)]
    return max(counts) - min(counts) if counts else 0


def _longest_gap(seen: dict[str, Seen]) -> float | None:
    gaps = []
    for s in seen.values():
        times = sorted(at for at, p in s.at_city if p.kind == wire.KIND_READINGS)
        gaps += [b - a for a, b in pairwise(times)]
    return round(max(gaps), 1) if gaps else None


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(0.95 * len(values)))])


def _overruns(board: BoardHandle) -> int:
    """Times the emulated I2S DMA ring overflowed so far."""
    return int(board.control("status")["peripherals"]["i2s_overruns"])


def _baseline(watch: Watch, devices: list[str], seconds: float) -> float | None:
    """The windows' p95 delay at the city with no rollout, over `seconds`."""
    watch.reset()
    time.sleep(seconds)
    with watch.lock:
        windows = [(at, p) for s in watch.nodes.values() for at, p in s.at_city
                   if p.kind == wire.KIND_READINGS and p.time_ms is not None]
    return _p95([(at - p.time_ms / 1000) * 1000 for at, p in windows])


def run(nodes: int, quick: bool) -> dict:
    window_s = 5 if quick else 10
    with tempfile.TemporaryDirectory(prefix="cn-bench-ota-") as name, \
            Mosquitto(Path(name) / "pole", persistence=True) as pole, \
            Mosquitto(Path(name) / "city") as city, \
            PoleTimeServer(Path(name) / "chrony") as clock:
        tmp = Path(name)
        scenario = tmp / "scenario.json"
        scenario.write_text(json.dumps({"start": "2026-04-15T12:00:00", "events": []}))
        extra = ["--scenario", str(scenario)]
        _, operator_pem = ops_init(tmp, (city.host, city.port))
        home = tmp / "ops"
        # boards that run MicroPython already, provisioned at host speed in one run
        emu = start_emulator(tmp, count=nodes, board=BOARD, extra=extra)
        try:
            devices = provision_boards(tmp, [b.url for b in emu.boards],
                                       f"{pole.host}:{pole.port}", window_s, operator_pem,
                                       board=BOARD, flash=False,
                                       ntp=f"{clock.host}:{clock.port}", pole=POLE)
        finally:
            emu.stop()
        # the same boards powered on into the app, at the chip's speed (the smoke run: the host's)
        emu = start_emulator(tmp, count=nodes, board=BOARD, extra=extra, chip_speed=not quick,
                             timeout=120)
        gateway = GatewayProcess(tmp / "gateway", pole, city, gateway_extra={
            "registry_dir": str(tmp / "fleet"), "operator_key": str(operator_pem),
            "id": POLE})
        watch = Watch(pole, city, devices)
        try:
            gateway.start()
            bundles = [build_bundle(tmp, home, v) for v in ("9.0.0", "9.1.0")]
            _wait_windows(watch, devices, timeout=300)
            before = _baseline(watch, devices, 2 * window_s if quick else 60)
            trial = 1 if quick else 600
            results = {"one_node": rollout(home, bundles[0], "9.0.0", devices[:1],
                                           emu.boards[:1], watch, trial)}
            if nodes > 1:
                results["all_nodes"] = rollout(home, bundles[1], "9.1.0", devices,
                                               emu.boards, watch, trial)
            bundle_bytes = len(split(bundles[0].read_bytes())[1])   # the files' bytes
        finally:
            watch.close()
            gateway.kill()
            emu.stop()
    return {"board": BOARD, "nodes": nodes, "quick": quick, "chip_speed": not quick,
            "speed_factor": emu.speed_factor, "window_s": window_s,
            "bundle_bytes": bundle_bytes, "window_delay_ms_p95_before": before,
            **results, "targets": TARGETS}


def _wait_windows(watch: Watch, devices: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(watch.first(d, 0, lambda kind, r: kind == wire.KIND_READINGS) for d in devices):
            return
        time.sleep(0.5)
    raise RuntimeError(f"not every node sent a window to the city in {timeout} s")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write <out>/ota.json")
    parser.add_argument("--nodes", type=int, default=NODES)
    parser.add_argument("--quick", action="store_true",
                        help="one node at host speed, no commit wait: the smoke run")
    args = parser.parse_args(argv)
    result = run(1 if args.quick else args.nodes, args.quick)
    save(result, args.out, "ota")
    return result


if __name__ == "__main__":
    main()

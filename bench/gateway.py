"""Gateway benchmark: `python -m bench.gateway --out bench/results [--backlog 200000]`.

One run, this machine, real Mosquitto brokers (citynode.mosquitto), one load generator
(a separate process publishing pre-signed envelopes at QoS 1), one upstream collector:

- es256_verify_per_s     the raw ES256 verify rate of `cryptography`
- bare_relay_msgs_per_s  a bare paho relay: subscribe QoS 1 -> publish QoS 1 upstream
                         (same topic and user properties as the gateway's)
- e2e_msgs_per_s         local broker -> verify -> commit -> upstream PUBACK -> delete
                         (both: median of --repeat alternating runs, runs listed too)
- ratio_vs_bare_relay    e2e / bare relay
- rss_mb_backlog_200k    peak RSS of the gateway (with its verifier process) while the
                         backlog is buffered (uplink down); rss_mb_samples shows it along
                         the way (flat is good)
- disk_bytes_per_msg     bytes the gateway wrote to storage (/proc/PID/io) per message
- drain_200k_s           uplink back -> buffer empty
- kill9_survived_fraction          uplink down, the gateway AND the local broker SIGKILLed
                                   after the node's messages were acknowledged
- mosquitto_bridge_kill9_survived_fraction   the same with a Mosquitto bridge at its
                                   default persistence, SIGKILLed with the uplink down
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.output import save
from citynode import wire
from citynode.mosquitto import Mosquitto
from citynode.testing.gateway import GATEWAY_ID, PREFIX, Collector, GatewayProcess
from citynode.testing.keys import TestDevice, seq_of

ROOT = Path(__file__).resolve().parent.parent
# the load comes from a few made-up devices at thousands of envelopes a second: far above
# what the gateway lets one real node send (local.device_burst, local.device_rate_per_s)
LOAD_NOT_NODES = {"device_burst": 10**9, "device_rate_per_s": 10**6}


# --- helpers run as separate processes -------------------------------------------------------

def publisher_main(port: int, path: str, inflight: int = 100) -> None:
    """Load generator: publish every envelope in `path` at QoS 1, as fast as acks allow."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"loadgen-{os.getpid()}")
    client.max_inflight_messages_set(inflight)
    client.connect("127.0.0.1", port)
    client.loop_start()
    window: list = []  # paho's message ids wrap at 65535: keep fewer outstanding
    for device, data in read_envelopes(Path(path)):
        window.append(client.publish(wire.up_topic(device), data, qos=1))
        if len(window) >= 20000:
            for info in window[:10000]:
                info.wait_for_publish(600)
            del window[:10000]
    for info in window:
        info.wait_for_publish(600)
    client.loop_stop()
    client.disconnect()


def relay_main(local_port: int, upstream_port: int, inflight: int = 32) -> None:
    """The bare relay: what a few lines of paho do without verify or store.

    It forwards to the same topic and with the same MQTT 5 user properties as the
    gateway (gateway id, receive time, historical=0), packed with the gateway's own
    encoder, so the upstream broker and the collector carry and decode the same bytes
    for both, and the relay pays no more for them than the gateway does.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from citynode.gateway.city import UserProperties, iso, user_property

    up = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bare-relay-up",
                     protocol=mqtt.MQTTv5)
    up.max_inflight_messages_set(inflight)
    up.connect("127.0.0.1", upstream_port)
    up.loop_start()
    topic = f"{PREFIX}/{GATEWAY_ID}/up/"
    head = user_property("gateway", GATEWAY_ID)
    tail = user_property("historical", "0")

    def on_message(client, userdata, message) -> None:
        stamp = iso(time.time())
        props = UserProperties([("gateway", GATEWAY_ID), ("received_at", stamp),
                                ("historical", "0")],
                               head + user_property("received_at", stamp) + tail)
        up.publish(topic + message.topic.rsplit("/", 1)[1], message.payload, qos=1,
                   properties=props)

    down = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bare-relay-down")
    down.on_connect = lambda c, u, f, rc, p: c.subscribe(wire.UP_PREFIX + "+", qos=1)
    down.on_message = on_message
    down.connect("127.0.0.1", local_port)
    down.loop_forever()


def write_envelopes(path: Path, items: list[tuple[str, bytes]]) -> None:
    with path.open("wb") as handle:
        for device, data in items:
            raw = device.encode()
            handle.write(struct.pack("<HH", len(raw), len(data)) + raw + data)


def read_envelopes(path: Path) -> list[tuple[str, bytes]]:
    blob, items, pos = path.read_bytes(), [], 0
    while pos < len(blob):
        n, m = struct.unpack_from("<HH", blob, pos)
        pos += 4
        items.append((blob[pos:pos + n].decode(), blob[pos + n:pos + n + m]))
        pos += n + m
    return items


def publish(port: int, path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.gateway", "publish", str(port),
                             str(path)], cwd=ROOT)


# --- measurements ----------------------------------------------------------------------------

def sign(devices: list[TestDevice], count: int) -> list[tuple[str, bytes]]:
    return [(devices[i % len(devices)].device_id, devices[i % len(devices)].envelope())
            for i in range(count)]


def verify_rate(seconds: float = 2.0) -> float:
    dev = TestDevice.random()
    envelope = wire.decode_envelope(dev.envelope())
    key, n, start = dev.key.public_key(), 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(200):
            wire.verify_es256(envelope, key)
        n += 200
    return n / (time.perf_counter() - start)


def wait_count(collector: Collector, n: int, timeout: float) -> float:
    start = time.perf_counter()
    while collector.up_count < n:  # a counter: polling must not cost the slower run more
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"only {collector.up_count} of {n} arrived upstream")
        time.sleep(0.02)
    return time.perf_counter()


def bare_relay_rate(tmp: Path, path: Path, n: int) -> float:
    with Mosquitto(tmp / "relay-local") as local, Mosquitto(tmp / "relay-up") as up:
        relay = subprocess.Popen([sys.executable, "-m", "bench.gateway", "relay",
                                  str(local.port), str(up.port)], cwd=ROOT)
        collector = Collector(up)  # the gateway's topics: the same bytes as e2e
        time.sleep(1.0)
        try:
            start = time.perf_counter()
            pub = publish(local.port, path)
            end = wait_count(collector, n, 300)
            pub.wait(60)
            return n / (end - start)
        finally:
            relay.kill()
            relay.wait()
            collector.close()


def e2e_rate(tmp: Path, path: Path, n: int, devices: list[TestDevice]) -> float:
    with Mosquitto(tmp / "e2e-local", persistence=True) as local, \
            Mosquitto(tmp / "e2e-up") as up:
        gw = GatewayProcess(tmp / "e2e-gw", local, up, devices, store={"commit_ms": 200},
                            local_extra=LOAD_NOT_NODES)
        collector = Collector(up)
        gw.start()
        gw.wait_for(lambda: gw.health()["uplink"] == "up")
        try:
            start = time.perf_counter()
            pub = publish(local.port, path)
            end = wait_count(collector, n, 600)
            pub.wait(60)
            gw.wait_for(lambda: gw.metric("buffered_messages") == 0, 60, "deletes")
            return n / (end - start)
        finally:
            gw.kill()
            collector.close()


def rss_mb(pid: int) -> float:
    """RSS of a process and its children (the gateway's verifier process counts too)."""
    total = 0.0
    for task in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{task}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in
                Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def io_written(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def backlog(tmp: Path, path: Path, n: int, devices: list[TestDevice]) -> dict:
    with Mosquitto(tmp / "bl-local", persistence=True) as local, \
            Mosquitto(tmp / "bl-up", persistence=True) as up:
        gw = GatewayProcess(tmp / "bl-gw", local, up, devices, store={"commit_ms": 200},
                            local_extra=LOAD_NOT_NODES)
        collector = Collector(up)  # persistent session: queued for it while up restarts
        gw.start()
        try:
            up.stop()
            gw.wait_for(lambda: gw.health()["uplink"] == "down")
            assert gw.proc is not None
            pid = gw.proc.pid
            written0, samples = io_written(pid), []
            pub = publish(local.port, path)
            start = time.perf_counter()
            while True:
                buffered = gw.metric("buffered_messages")
                samples.append((round(time.perf_counter() - start, 1), int(buffered),
                                round(rss_mb(pid), 1)))
                if buffered >= n:
                    break
                if time.perf_counter() - start > 1800:
                    raise RuntimeError("backlog not buffered in 30 min")
                time.sleep(1.0)
            ingest_s = time.perf_counter() - start
            pub.wait(60)
            written = io_written(pid) - written0
            db_bytes = sum(p.stat().st_size for p in gw.state.glob("gateway.db*"))
            start = time.perf_counter()
            up.start()
            gw.wait_for(lambda: gw.metric("buffered_messages") == 0, 1800, "drain")
            drain_s = time.perf_counter() - start
            wait_count(collector, n, 120)
            return {"rss_mb_backlog": max(s[2] for s in samples),
                    "rss_mb_samples": samples[:: max(1, len(samples) // 10)] + samples[-1:],
                    "disk_bytes_per_msg": written / n, "db_file_bytes_per_msg": db_bytes / n,
                    "backlog_ingest_msgs_per_s": n / ingest_s, "drain_s": drain_s,
                    "drain_msgs_per_s": n / drain_s,
                    "lost": n - len(set(collector.keys()))}
        finally:
            gw.kill()
            collector.close()


def kill9_gateway(tmp: Path, path: Path, n: int, devices: list[TestDevice]) -> float:
    with Mosquitto(tmp / "k-local", persistence=True) as local, \
            Mosquitto(tmp / "k-up", persistence=True) as up:
        gw = GatewayProcess(tmp / "k-gw", local, up, devices, local_extra=LOAD_NOT_NODES)
        collector = Collector(up)
        gw.start()
        try:
            up.stop()
            gw.wait_for(lambda: gw.health()["uplink"] == "down")
            publish(local.port, path).wait(120)  # every message acknowledged to the node
            gw.wait_for(lambda: gw.metric("buffered_messages") >= n, 120, "buffered")
            gw.kill()
            local.kill()  # the whole pole dies, not just the gateway
            local.start()
            gw.start()
            up.start()
            try:
                gw.wait_for(lambda: gw.metric("buffered_messages") == 0, 60, "drain")
            except AssertionError:
                pass
            time.sleep(1.0)
            return len(set(collector.keys())) / n
        finally:
            gw.kill()
            collector.close()


def kill9_bridge(tmp: Path, path: Path, n: int) -> float:
    with Mosquitto(tmp / "b-up", persistence=True) as up:
        collector = Collector(up, "bench/bridge/#")
        up.stop()
        bridge_conf = (f"connection city\naddress 127.0.0.1:{up.port}\n"
                       "topic # out 1 citynode/up/ bench/bridge/up/\n"
                       "cleansession false\nrestart_timeout 1\n")
        bridge = Mosquitto(tmp / "b-bridge", extra_config=bridge_conf, unlimited_queues=False)
        bridge.start()  # persistence at its default (false), default queue limits
        try:
            publish(bridge.port, path).wait(120)  # every message acknowledged to the node
            time.sleep(0.5)
            bridge.kill()
            bridge.start()
            up.start()
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline and len(collector.envelopes()) < n:
                time.sleep(0.2)
            return len({seq_of(p) for _, p, _ in collector.envelopes()}) / n
        finally:
            bridge.stop()
            collector.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["publish"]:
        publisher_main(int(argv[1]), argv[2])
        return 0
    if argv[:1] == ["relay"]:
        relay_main(int(argv[1]), int(argv[2]))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the brokers' cleanup
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__)
    parser.add_argument("--out", default="bench/results", help="directory for gateway.json")
    parser.add_argument("--messages", type=int, default=20000, help="e2e and relay runs")
    parser.add_argument("--backlog", type=int, default=200000, help="backlog size")
    parser.add_argument("--kill-messages", type=int, default=1000,
                        help="messages in the SIGKILL runs (Mosquitto queues 1000 by default)")
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3,
                        help="alternating relay/e2e runs; the medians are reported")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run for make test: the same stages on a few hundred "
                             "messages (~20 s); the numbers are not comparable")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.backlog, args.kill_messages = 200, 500, 100
        args.devices, args.repeat = 3, 1

    devices = [TestDevice.random() for _ in range(args.devices)]
    results: dict = {"params": {"messages": args.messages, "backlog": args.backlog,
                                "repeat": args.repeat, "quick": args.quick,
                                "kill_messages": args.kill_messages, "devices": args.devices,
                                "machine": platform.machine(), "cpus": os.cpu_count(),
                                "python": platform.python_version(),
                                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    with tempfile.TemporaryDirectory(prefix="citynode-bench-") as name:
        tmp = Path(name)
        print(f"signing {args.messages + args.backlog + args.kill_messages} envelopes ...",
              flush=True)
        sets = {}
        for key, count in (("e2e", args.messages), ("backlog", args.backlog),
                           ("kill", args.kill_messages)):
            sets[key] = tmp / f"{key}.bin"
            write_envelopes(sets[key], sign(devices, count))
        results["es256_verify_per_s"] = round(verify_rate(0.3 if args.quick else 2.0))
        print("verify", results["es256_verify_per_s"], flush=True)
        relay_runs, e2e_runs = [], []
        for run in range(args.repeat):  # alternate, so load on the machine hits both alike
            relay_runs.append(round(bare_relay_rate(tmp / f"r{run}", sets["e2e"],
                                                    args.messages), 1))
            e2e_runs.append(round(e2e_rate(tmp / f"e{run}", sets["e2e"], args.messages,
                                           devices), 1))
            print("bare relay", relay_runs[-1], "e2e", e2e_runs[-1], flush=True)
        results["bare_relay_msgs_per_s"] = statistics.median(relay_runs)
        results["e2e_msgs_per_s"] = statistics.median(e2e_runs)
        results["bare_relay_runs"], results["e2e_runs"] = relay_runs, e2e_runs
        results["ratio_vs_bare_relay"] = round(
            results["e2e_msgs_per_s"] / results["bare_relay_msgs_per_s"], 3)
        bl = backlog(tmp, sets["backlog"], args.backlog, devices)
        print("backlog", {k: v for k, v in bl.items() if k != "rss_mb_samples"}, flush=True)
        results.update({
            "rss_mb_backlog_200k": bl["rss_mb_backlog"],
            "disk_bytes_per_msg": round(bl["disk_bytes_per_msg"], 1),
            "drain_200k_s": round(bl["drain_s"], 2),
            "drain_msgs_per_s": round(bl["drain_msgs_per_s"], 1),
            "drain_vs_e2e": round(bl["drain_msgs_per_s"] / results["e2e_msgs_per_s"], 3),
            "backlog_ingest_msgs_per_s": round(bl["backlog_ingest_msgs_per_s"], 1),
            "db_file_bytes_per_msg": round(bl["db_file_bytes_per_msg"], 1),
            "backlog_lost": bl["lost"],
            "rss_mb_samples": [{"t_s": t, "buffered": b, "rss_mb": r}
                               for t, b, r in bl["rss_mb_samples"]],
        })
        results["kill9_survived_fraction"] = round(
            kill9_gateway(tmp, sets["kill"], args.kill_messages, devices), 4)
        results["mosquitto_bridge_kill9_survived_fraction"] = round(
            kill9_bridge(tmp, sets["kill"], args.kill_messages), 4)
    save(results, args.out, "gateway", hide=("rss_mb_samples",))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Crashes, outages and full disks: nothing accepted is lost, and every loss is reported."""

from __future__ import annotations

import json
import threading
import time

from citynode import wire
from citynode.testing.gateway import Collector, GatewayProcess, Node
from citynode.testing.keys import TestDevice, seq_of


def stream(node: Node, items: list[tuple[str, bytes]], rate: float) -> threading.Thread:
    """Publish in the background at about `rate` messages/s, each confirmed by the broker."""
    def run():
        for device, data in items:
            node.publish(device, data, wait=False)
            time.sleep(1 / rate)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def assert_exactly(collector: Collector, items: list[tuple[str, bytes]]) -> None:
    sent = {seq_of(e) for _, e in items}
    got = collector.keys()
    assert set(got) == sent, f"missing {sorted(sent - set(got))[:10]}"
    # duplicates, if any, are the same (device, seq) with the same bytes
    payloads = {}
    for _, payload, _ in collector.envelopes():
        assert payloads.setdefault(seq_of(payload), payload) == payload


def test_sigkill_mid_stream_several_times_loses_nothing(tmp_path, local_broker, upstream_broker):
    devices = [TestDevice.random() for _ in range(3)]
    collector, node = Collector(upstream_broker), Node(local_broker)
    gw = GatewayProcess(tmp_path / "gw", local_broker, upstream_broker, devices).start()
    items = [(d.device_id, d.envelope()) for _ in range(150) for d in devices]
    publisher = stream(node, items, rate=300)
    try:
        for _ in range(4):
            time.sleep(0.35)
            gw.kill()  # SIGKILL: no chance to flush or ack anything
            time.sleep(0.1)
            gw.start()
        publisher.join(30)
        gw.wait_for(lambda: set(collector.keys()) >= {seq_of(e) for _, e in items},
                    timeout=30, what="every envelope upstream")
        gw.wait_for(lambda: gw.metric("buffered_messages") == 0, what="buffer drained")
        assert_exactly(collector, items)
        assert gw.starts == 5
    finally:
        gw.kill()
        node.close()
        collector.close()


def test_upstream_broker_restarts_and_crashes(tmp_path, local_broker, upstream_broker):
    devices = [TestDevice.random() for _ in range(2)]
    collector, node = Collector(upstream_broker), Node(local_broker)
    gw = GatewayProcess(tmp_path / "gw", local_broker, upstream_broker, devices).start()
    items = [(d.device_id, d.envelope()) for _ in range(150) for d in devices]
    publisher = stream(node, items, rate=300)
    try:
        time.sleep(0.3)
        upstream_broker.restart()  # clean restart: its persistence keeps the collector's queue
        time.sleep(0.4)
        upstream_broker.stop()
        time.sleep(0.5)
        upstream_broker.start()
        publisher.join(30)
        gw.wait_for(lambda: gw.metric("buffered_messages") == 0, timeout=30, what="drained")
        gw.wait_for(lambda: set(collector.keys()) >= {seq_of(e) for _, e in items},
                    timeout=20, what="collector complete")
        assert_exactly(collector, items)
        assert gw.metric("uplink_connects_total") >= 3
    finally:
        gw.kill()
        node.close()
        collector.close()


def test_quota_exhaustion_drops_oldest_readings_keeps_events_and_reports_gaps(
        tmp_path, local_broker, upstream_broker):
    dev = TestDevice.random()
    collector, node = Collector(upstream_broker), Node(local_broker)
    gw = GatewayProcess(tmp_path / "gw", local_broker, upstream_broker, [dev],
                        store={"max_rows": 30}).start()
    try:
        upstream_broker.stop()
        gw.wait_for(lambda: gw.health()["uplink"] == "down", what="uplink down")
        events = [(dev.device_id, dev.envelope(kind=wire.KIND_EVENT)) for _ in range(5)]
        readings = [(dev.device_id, dev.envelope()) for _ in range(60)]
        node.publish_all(events + readings)
        gw.wait_for(lambda: gw.metric("received_total") == 65, what="all received")
        gw.wait_for(lambda: gw.metric("dropped_total") > 0)
        dropped = gw.metric("dropped_total", device=dev.device_id, reason="quota")
        assert gw.metric("buffered_messages") <= 30 + 1  # + the open gap record
        upstream_broker.start()
        gw.wait_for(lambda: gw.metric("buffered_messages") == 0, what="drained")
        gw.wait_for(lambda: collector.of("gap"), what="gap record")
        keys = set(collector.keys())
        assert {seq_of(e) for _, e in events} <= keys  # events are kept longest
        lost = [seq_of(e) for _, e in readings if seq_of(e) not in keys]
        assert len(lost) == dropped > 0
        newest = [seq_of(e) for _, e in readings[-10:]]
        assert set(newest) <= keys  # oldest readings went first
        gaps = [json.loads(p) for _, p, _, _ in collector.of("gap")]
        assert sum(g["count"] for g in gaps) == dropped
        assert all(g["device"] == dev.device_id and g["reason"] == "quota" for g in gaps)
        assert min(g["first_seq"] for g in gaps) == min(s for _, s in lost)
        assert max(g["last_seq"] for g in gaps) == max(s for _, s in lost)
        # acked all 65: nothing is stuck in the local broker
        assert gw.metric("rejected_total") == 0
    finally:
        gw.kill()
        node.close()
        collector.close()


def test_corrupt_database_at_start_is_quarantined(tmp_path, local_broker, upstream_broker):
    dev = TestDevice.random()
    collector, node = Collector(upstream_broker), Node(local_broker)
    gw = GatewayProcess(tmp_path / "gw", local_broker, upstream_broker, [dev])
    gw.state.mkdir(parents=True)
    (gw.state / "gateway.db").write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 40)
    try:
        gw.start()
        assert gw.metric("store_quarantined_total") == 1
        assert gw.metric("store_quarantined_files") == 1
        assert len(list(gw.state.glob("gateway.db.corrupt-*"))) == 1
        assert "is corrupt" in gw.log()
        node.publish(dev.device_id, dev.envelope())
        gw.wait_for(lambda: len(collector.envelopes()) == 1, what="forwarding on a fresh db")
        assert gw.health()["quarantined_files"] == 1
    finally:
        gw.kill()
        node.close()
        collector.close()


def test_sigterm_commits_and_acks_what_it_has(tmp_path, local_broker, upstream_broker):
    devices = [TestDevice.random() for _ in range(2)]
    collector, node = Collector(upstream_broker), Node(local_broker)
    gw = GatewayProcess(tmp_path / "gw", local_broker, upstream_broker, devices).start()
    items = [(d.device_id, d.envelope()) for _ in range(100) for d in devices]
    publisher = stream(node, items, rate=400)
    try:
        time.sleep(0.25)
        assert gw.terminate() == 0
        assert "stopped; received" in gw.log()
        gw.start()
        publisher.join(30)
        gw.wait_for(lambda: set(collector.keys()) >= {seq_of(e) for _, e in items},
                    what="complete after a clean restart")
        assert_exactly(collector, items)
    finally:
        gw.kill()
        node.close()
        collector.close()


def test_local_broker_gone_for_too_long_exits_non_zero(tmp_path, local_broker, upstream_broker):
    gw = GatewayProcess(tmp_path / "gw", local_broker, upstream_broker, [],
                        gateway_extra={}, store={})
    text = gw.config.read_text().replace("[local]\n", "[local]\ndown_exit_s = 1\n")
    gw.config.write_text(text)
    gw.start()
    try:
        local_broker.stop()
        assert gw.proc.wait(15) == 5
        assert "unreachable" in gw.log()
    finally:
        gw.kill()


def test_a_hung_upstream_connect_makes_the_daemon_exit_for_a_restart(
        tmp_path, local_broker, upstream_broker):
    import socket

    silent = socket.socket()  # accepts TCP, never answers the TLS handshake
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    gw = GatewayProcess(tmp_path / "gw", local_broker, upstream_broker, [],
                        upstream_extra={"port": silent.getsockname()[1], "tls": True},
                        gateway_extra={"stall_exit_s": 1.5})
    try:
        gw.start()
        assert gw.proc.wait(20) == 4
        assert "stuck" in gw.log()
    finally:
        gw.kill()
        silent.close()

"""Where each node stands reaches the city without the registry (issue 13, "Place"): the
real gateway keeps a retained SenML pack per device on the city's broker, changes it
when a reload changes the registry, clears it when a device is revoked, and sends every
place again after the city's broker lost what it retained."""

from __future__ import annotations

import json
import signal
import time
from dataclasses import replace

from citynode.registry import write_record
from citynode.subscriber import Subscriber
from citynode.testing.gateway import GATEWAY_ID, PREFIX, Collector, GatewayProcess
from citynode.testing.keys import TestDevice

META = f"{PREFIX}/{GATEWAY_ID}/meta/"


def retained(broker, seconds: float = 1.0) -> dict[str, bytes]:
    """What a city client that subscribes now is handed: the retained places."""
    got: dict[str, bytes] = {}
    sub = Subscriber(broker.host, broker.port, META + "+",
                     on_message=lambda m: got.__setitem__(m.topic[len(META):], m.payload))
    time.sleep(seconds)
    sub.close()
    return got


def senml(pack: bytes) -> dict[str, object]:
    records = json.loads(pack)
    base = records[0]["bn"]
    return {"device": base.rstrip("/"),
            **{r["n"]: (r.get("v", r.get("vs")), r.get("u")) for r in records}}


def test_each_nodes_place_is_retained_upstream_and_follows_the_registry(
        tmp_path, local_broker, upstream_broker):
    a, b = TestDevice.random(), TestDevice.random()
    gw = GatewayProcess(tmp_path / "gw", local_broker, upstream_broker)
    write_record(gw.registry, replace(a.record(), lat=48.2082, lon=16.3738, height_m=6.5))
    write_record(gw.registry, b.record())
    gw.start()
    try:
        gw.wait_for(lambda: len(retained(upstream_broker, 0.3)) == 2, what="both places")
        places = {device: senml(pack) for device, pack in retained(upstream_broker).items()}
        assert places[a.device_id] == {
            "device": a.device_id, "lat": (48.2082, "lat"), "lon": (16.3738, "lon"),
            "height": (6.5, "m"), "site": ("test", None), "pole": ("pole-1", None),
            "board": ("esp32-devkitc", None)}
        assert "height" not in places[b.device_id]          # the registry does not know it

        # the city watches; the pole is moved, the other node revoked; the gateway reloads
        city = Collector(upstream_broker, topic=META + "+")
        write_record(gw.registry, replace(a.record(), lat=48.21, lon=16.37, height_m=7.0))
        write_record(gw.registry, b.record(status="revoked"))
        gw.signal(signal.SIGHUP)

        def latest() -> dict[str, bytes]:    # per device, the last the city was sent
            return {topic[len(META):]: payload for topic, payload, _, _ in city.records}

        gw.wait_for(lambda: latest().get(b.device_id) == b"", what="the revoked node cleared")
        city.close()
        assert senml(latest()[a.device_id])["lat"] == (48.21, "lat")
        assert senml(latest()[a.device_id])["height"] == (7.0, "m")
        assert set(retained(upstream_broker)) == {a.device_id}

        # the city's broker restarts without its retained messages: every place again
        upstream_broker.kill()
        for name in upstream_broker.workdir.glob("*.db"):
            name.unlink()
        upstream_broker.start()
        gw.wait_for(lambda: set(retained(upstream_broker, 0.3)) == {a.device_id},
                    timeout=30, what="the place sent again after the reconnect")
    finally:
        gw.kill()

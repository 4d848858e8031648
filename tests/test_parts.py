"""The firmware's registry of parts (firmware/node/sensors.py PARTS) and the host's
table (citynode/parts.py PARTS) name the same parts, buses and quantities: the registry
runs on the real MicroPython unix port, as it does on the node."""

from __future__ import annotations

from citynode.parts import PARTS
from citynode.provisioning.device import last_json
from citynode.testing.micropython import run_micropython

REGISTRY = """
import json
from node import sensors
print(json.dumps({name: [cls.BUS, cls.QUANTITIES] for name, cls in sensors.PARTS.items()}))
"""

VALIDATE = """
from node import config
base = {"device": "cn-240ac4e29526", "wifi": {"ssid": "pole"}}
for name in %r:
    cfg = dict(base, sensors={name: {}})
    try:
        config.validate(cfg)
        print(name, "ok")
    except config.ConfigError as exc:
        print(name, exc)
"""


def test_firmware_registry_matches_the_host_table():
    firmware = last_json(run_micropython(REGISTRY))
    host = {name: [part.bus, [[q.name, q.unit] for q in part.quantities]]
            for name, part in PARTS.items()}
    assert firmware == host


def test_config_accepts_exactly_the_registry_parts():
    out = run_micropython(VALIDATE % ([*PARTS, "ccs811"],)).strip().splitlines()
    assert out[:-1] == [f"{name} ok" for name in PARTS]
    assert out[-1] == "ccs811 config.json: 'sensors.ccs811' is not a sensor we drive"

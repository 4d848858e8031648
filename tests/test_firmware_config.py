"""The node's configuration and its secrets (firmware/node/config.py) on the MicroPython
unix port: the pole broker's login comes from /secret/broker.json, and report_config's
view of the configuration holds neither password."""

from __future__ import annotations

import json

from citynode.provisioning.device import last_json
from citynode.testing.micropython import run_micropython

LOAD = """
import json
from node import config
cfg = config.load({cfg!r}, {wifi!r}, {broker!r})
print(json.dumps([config.broker_login(cfg), config.public_view(cfg)]))
"""


def run(tmp_path, broker_secret: dict | None):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"device": "cn-240ac4e29526", "wifi": {"ssid": "pole"}}))
    (tmp_path / "wifi.json").write_text(json.dumps({"password": "wifi-s3cret"}))
    broker = tmp_path / "broker.json"
    if broker_secret is not None:
        broker.write_text(json.dumps(broker_secret))
    return last_json(run_micropython(LOAD.format(cfg=str(cfg), wifi=str(tmp_path / "wifi.json"),
                                                 broker=str(broker))))


def test_the_node_logs_in_as_its_device_with_its_secret(tmp_path):
    login, view = run(tmp_path, {"password": "broker-s3cret"})
    assert login == ["cn-240ac4e29526", "broker-s3cret"]
    shown = json.dumps(view)
    assert "broker-s3cret" not in shown and "wifi-s3cret" not in shown
    assert view["broker"]["user"] == "cn-240ac4e29526"


def test_without_a_secret_the_node_connects_without_a_login(tmp_path):
    # an open bench broker; the pole's refuses it with CONNACK 5 and a hint (node/mqtt.py)
    assert run(tmp_path, None)[0] == [None, None]
    assert run(tmp_path, {"password": 42})[0] == [None, None]       # damaged: no login


VALIDATE = """
import json
from node import config
out = []
for extra in ({CASES}):
    cfg = {"device": "cn-240ac4e29526", "wifi": {"ssid": "pole"}}
    cfg.update(extra)
    try:
        config.validate(cfg)
        out.append("ok")
    except config.ConfigError as exc:
        out.append(str(exc))
print(json.dumps(out))
"""


def validate_each(cases: list[dict]) -> list[str]:
    """config.validate on the node's VM for each case (keys over a minimal config):
    "ok" or the ConfigError's message."""
    return last_json(run_micropython(VALIDATE.replace("{CASES}", repr(cases))))


def test_lighting_settings_a_street_cannot_use_are_refused_by_name():
    cases = [{"quiet_level": 30, "on_at": "19:15"}, {"quiet_level": 130}, {"on_at": "25:00"},
             {"dusk_lux": 60}, {"glow": 1}]
    out = validate_each([{"lighting": case} for case in cases])
    assert out[0] == "ok"
    assert "lighting.quiet_level" in out[1] and "0..100 %" in out[1]
    assert "lighting.on_at" in out[2] and "HH:MM" in out[2]
    assert "lighting.dawn_lux" in out[3] and "above dusk_lux" in out[3]
    assert "lighting.glow" in out[4] and "dusk_lux" in out[4]


def test_how_long_a_boot_must_run_healthy_is_a_setting_within_bounds():
    """healthy_s (provisioning's --healthy-s): a boot this long healthy clears the crash
    count and keeps an update on trial; too short would keep a build that crashes later."""
    out = validate_each([{"healthy_s": 15}, {"healthy_s": 5}, {"healthy_s": 7200}])
    assert out[0] == "ok"
    assert all("healthy_s" in o and "between 10 and 3600" in o for o in out[1:]), out

"""The files in deploy/ work as shipped."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

from citynode.mosquitto import Mosquitto, free_port

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_pole_mosquitto_conf_starts_a_broker(tmp_path):
    port = free_port()
    text = (DEPLOY / "mosquitto.conf").read_text()
    text = re.sub(r"^listener 1883$", f"listener {port} 127.0.0.1", text, flags=re.M)
    text = text.replace("/var/lib/mosquitto/", f"{tmp_path}/").replace(
        "log_dest syslog", f"log_dest file {tmp_path}/log")
    broker = Mosquitto(tmp_path, port=port, extra_config=text)
    broker._write_config = lambda: broker.conf.write_text(  # the shipped file, not ours
        f"user {__import__('getpass').getuser()}\n" + text)
    broker.start()
    try:
        assert broker.running
    finally:
        broker.stop()


def test_systemd_unit_is_notify_with_watchdog_and_hardening():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(DEPLOY / "citynode-gateway.service")
    service = unit["Service"]
    assert service["Type"] == "notify" and int(service["WatchdogSec"]) > 0
    assert service["StateDirectory"] == "citynode" and service["DynamicUser"] == "yes"
    assert service["ProtectSystem"] == "strict" and service["Restart"] == "always"
    assert "citynode-gateway run --config" in service["ExecStart"]


def test_systemd_notify_ready_and_watchdog(tmp_path, local_broker, upstream_broker):
    import socket

    from citynode.testing.gateway import GatewayProcess

    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    gw = GatewayProcess(tmp_path / "gw", local_broker, upstream_broker, [])
    gw.start(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    try:
        seen = [sock.recv(256) for _ in range(3)]
        assert seen[0] == b"READY=1" and seen[1:] == [b"WATCHDOG=1"] * 2
        assert gw.terminate() == 0
        rest = []
        while True:
            try:
                sock.settimeout(0.5)
                rest.append(sock.recv(256))
            except TimeoutError:
                break
        assert b"STOPPING=1" in rest
    finally:
        gw.kill()
        sock.close()

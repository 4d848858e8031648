"""The files in deploy/ work as shipped."""

from __future__ import annotations

import configparser
import getpass
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from citynode.mosquitto import PoleBroker, free_port, mosquitto_binary

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_pole_mosquitto_conf_starts_a_broker_on_both_listeners(tmp_path):
    # the shipped conf and ACL, listeners moved to loopback ports (citynode.mosquitto);
    # the attacks it refuses are in tests/test_pole_broker.py
    with PoleBroker(tmp_path) as broker:
        for port in (broker.port, broker.node_port):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        assert "Error" not in broker.log()


def test_the_pole_conf_starts_where_debian_includes_it(tmp_path):
    # README: deploy/mosquitto.conf goes to /etc/mosquitto/conf.d/, which the Debian
    # package's own mosquitto.conf includes; any option both set once (persistence_location
    # did) stops the broker: "Duplicate ... value in configuration".
    debian = Path("/etc/mosquitto/mosquitto.conf")
    assert debian.exists(), "the mosquitto package's config is missing: run `make setup`"
    main = debian.read_text()
    for path in ("/run/mosquitto/", "/var/lib/mosquitto/", "/var/log/mosquitto/"):
        main = main.replace(path, f"{tmp_path}/")
    main = main.replace("/etc/mosquitto/conf.d", str(tmp_path / "conf.d"))
    (tmp_path / "conf.d").mkdir()
    ports = [free_port(), free_port()]
    ours = (DEPLOY / "mosquitto.conf").read_text().replace(
        "/etc/mosquitto/citynode/", f"{tmp_path}/")
    ours = re.sub(r"^listener 1883 \S+$", lambda m: f"listener {ports.pop()} 127.0.0.1", ours,
                  flags=re.M)
    (tmp_path / "conf.d" / "citynode.conf").write_text(ours)
    (tmp_path / "passwd").write_text("")
    (tmp_path / "acl").write_text((DEPLOY / "mosquitto.acl").read_text())
    (tmp_path / "main.conf").write_text(f"user {getpass.getuser()}\n" + main)
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(tmp_path / "main.conf")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)
        assert proc.poll() is None, proc.communicate()[0] + (tmp_path / "mosquitto.log"
                                                             ).read_text(errors="replace")
    finally:
        proc.terminate()
        proc.wait(10)


def test_systemd_unit_is_notify_with_watchdog_and_hardening():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(DEPLOY / "citynode-gateway.service")
    service = unit["Service"]
    assert service["Type"] == "notify" and int(service["WatchdogSec"]) > 0
    assert service["StateDirectory"] == "citynode" and service["DynamicUser"] == "yes"
    assert service["ProtectSystem"] == "strict" and service["Restart"] == "always"
    assert "citynode-gateway run --config" in service["ExecStart"]


def test_systemd_accepts_the_shipped_unit(tmp_path):
    # the unit as shipped, the program where this test's install put it
    gateway = Path(sys.executable).parent / "citynode-gateway"
    text = (DEPLOY / "citynode-gateway.service").read_text()
    unit = tmp_path / "citynode-gateway.service"
    unit.write_text(text.replace("/usr/local/bin/citynode-gateway", str(gateway)))
    run = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                         capture_output=True, text=True)
    assert run.returncode == 0 and not run.stdout + run.stderr, run.stdout + run.stderr
    # the broker's accounts are rewritten before every start and at every reload, as root
    # (at start a failure is ignored: `run` then meets the bad config itself, tests/systemd)
    accounts = re.compile(r"^Exec(StartPre|Reload)=-?\+/usr/local/bin/citynode-gateway "
                          r"broker-accounts --config \S+ --out /etc/mosquitto/citynode/passwd$",
                          re.M)
    assert {m.group(1) for m in accounts.finditer(text)} == {"StartPre", "Reload"}
    assert re.search(r"^LoadCredential=pole-broker\.secret:/etc/citynode/pole-broker\.secret$",
                     text, re.M)


def test_systemd_notify_ready_and_watchdog(tmp_path, local_broker, upstream_broker):

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

"""`make install-gateway`, the Pi's install path (issue 12), staged with DESTDIR: every
file the shipped unit names is where the install puts it, the staged program, config
and secret work together, the service runs as an unprivileged user as the unit runs it
(DynamicUser=), and a second run keeps the configuration and the secret.

The program comes from PyPI and this checkout, as on a pole (pip, in a virtualenv of
its own made by the system's Python); nothing is installed into the system (DESTDIR:
no apt, no systemctl)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import time
import tomllib
from dataclasses import replace
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from citynode import pole_broker, wire
from citynode.mosquitto import PoleBroker
from citynode.registry import write_record
from citynode.testing.gateway import Collector, GatewayProcess
from citynode.testing.keys import TestDevice, seq_of

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"   # a Pi's; the service's user cannot enter /root's pyenv
SERVICE_USER = "nobody"              # stands in for the unit's DynamicUser
# builds from this checkout, as tests/test_wheel_install.py does: one at a time
pytestmark = pytest.mark.xdist_group("wheel")


def install(root: Path) -> str:
    run = subprocess.run(["make", "-s", "install-gateway", f"DESTDIR={root}",
                          f"PYTHON={SYSTEM_PYTHON}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def staged(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


@pytest.fixture(scope="module")
def system():
    """One staged install for the module's tests (in file order), in a directory any
    user may enter, as / is."""
    root = Path(tempfile.mkdtemp(prefix="citynode-root-"))
    root.chmod(0o755)
    install(root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_make_install_gateway_puts_everything_where_the_unit_expects_it(system, tmp_path):
    root = system
    unit = staged(root, "/etc/systemd/system/citynode-gateway.service").read_text()
    assert unit == (ROOT / "deploy" / "citynode-gateway.service").read_text()
    # the program the unit runs: a link into the install's own virtualenv
    program = staged(root, "/usr/local/bin/citynode-gateway")
    assert os.readlink(program) == "/opt/citynode/bin/citynode-gateway"
    real = staged(root, os.readlink(program))
    assert subprocess.run([str(real), "--help"], capture_output=True).returncode == 0
    # every other file the unit names
    named = set(re.findall(r"(?:--config |--out |LoadCredential=[^:]+:|file://)(/\S+)", unit))
    assert named == {"/etc/citynode/gateway.toml", "/etc/mosquitto/citynode/passwd",
                     "/etc/citynode/pole-broker.secret", "/usr/share/doc/citynode/README.md"}
    for path in named - {"/etc/mosquitto/citynode/passwd"}:     # that one ExecStartPre writes
        assert staged(root, path).is_file(), path
    secret = staged(root, "/etc/citynode/pole-broker.secret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    # the config's and the broker config's paths
    config = tomllib.loads(staged(root, "/etc/citynode/gateway.toml").read_text())
    assert staged(root, config["gateway"]["registry_dir"]).is_dir()
    assert config["local"]["password_file"] == "/etc/citynode/pole-broker.secret"
    broker = staged(root, "/etc/mosquitto/conf.d/citynode.conf").read_text()
    acl = re.search(r"^acl_file (\S+)$", broker, re.M).group(1)
    passwd = re.search(r"^password_file (\S+)$", broker, re.M).group(1)
    assert staged(root, acl).read_text() == (ROOT / "deploy" / "mosquitto.acl").read_text()
    assert stat.S_IMODE(staged(root, acl).stat().st_mode) == 0o640
    assert staged(root, passwd).parent.is_dir()
    # the nodes' time server: what tests and the demo run (citynode.chrony)
    assert (staged(root, "/etc/chrony/conf.d/citynode.conf").read_text()
            == (ROOT / "deploy" / "chrony.conf").read_text())
    # the staged program, config and secret together: what ExecStartPre does
    text = staged(root, "/etc/citynode/gateway.toml").read_text()
    local = tmp_path / "gateway.toml"
    local.write_text(text.replace('"/etc/citynode', f'"{root}/etc/citynode'))
    run = subprocess.run([str(real), "broker-accounts", "--config", str(local), "--out",
                          str(staged(root, passwd))], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    accounts = dict(line.split(":", 1) for line in
                    staged(root, passwd).read_text().splitlines())
    assert pole_broker.secret_matches(pole_broker.read_secret(secret),
                                      accounts[pole_broker.GATEWAY_USER])


def as_service_user(path: Path, mode: int) -> Path:
    """What systemd does for the unit's StateDirectory= and LoadCredential=."""
    account = pwd.getpwnam(SERVICE_USER)
    os.chown(path, account.pw_uid, account.pw_gid)
    path.chmod(mode)
    return path


def test_the_service_runs_as_an_unprivileged_user_on_the_installed_files(
        system, tmp_path, upstream_broker):
    root = system
    program = str(staged(root, "/opt/citynode/bin/citynode-gateway"))
    etc = staged(root, "/etc/citynode")
    secret = etc / "pole-broker.secret"
    # provisioning registered a node (the record 0644: a public key and a hash)
    device, node_secret = TestDevice.random(), pole_broker.new_secret()
    write_record(etc / "registry", replace(device.record(),
                                          broker_hash=pole_broker.hash_secret(node_secret)))
    state = staged(root, "/var/lib/citynode")
    state.mkdir(parents=True)
    as_service_user(state, 0o700)
    pole = PoleBroker(tmp_path / "pole")
    # the operator's edits: the brokers' addresses; the paths stay the installed ones
    gw = GatewayProcess(etc, pole, upstream_broker, local_extra={
        "username": pole_broker.GATEWAY_USER, "password_file": str(secret)},
        gateway_extra={"state_dir": str(state)})
    # ExecStartPre=+ (as root): the broker's accounts from the registry
    run = subprocess.run([program, "broker-accounts", "--config", str(gw.config), "--out",
                          str(pole.passwd)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    collector = Collector(upstream_broker)
    node = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device.device_id)
    node.username_pw_set(device.device_id, node_secret)
    try:
        pole.start()
        # without LoadCredential= the service's user cannot read the 0600 secret: a
        # config error that says so (exit 2, which the unit does not restart)
        with pytest.raises(RuntimeError) as refused:
            gw.start(program=program, user=SERVICE_USER)
        assert "exited 2" in str(refused.value)
        assert "LoadCredential=pole-broker.secret:" in str(refused.value)
        # LoadCredential=: systemd's copy, readable by the service's user only
        credentials = staged(root, "/run/credentials/citynode-gateway.service")
        credentials.mkdir(parents=True)
        shutil.copy(secret, credentials / secret.name)
        as_service_user(credentials / secret.name, 0o400)
        as_service_user(credentials, 0o500)
        gw.start(program=program, user=SERVICE_USER,
                 env={"CREDENTIALS_DIRECTORY": str(credentials)})
        node.connect(pole.host, pole.node_port)
        node.loop_start()
        sent = [device.envelope() for _ in range(3)]
        for envelope in sent:
            node.publish(wire.up_topic(device.device_id), envelope, qos=1).wait_for_publish(10)
        gw.wait_for(lambda: collector.up_count >= len(sent), what="the readings upstream")
        time.sleep(0.3)  # nothing more may come
        assert collector.keys() == [seq_of(envelope) for envelope in sent]
        # what the service wrote is its own and private (UMask=0077)
        written = list(state.iterdir())
        assert written
        for path in written:
            info = path.stat()
            assert info.st_uid == pwd.getpwnam(SERVICE_USER).pw_uid, path
            assert stat.S_IMODE(info.st_mode) & 0o077 == 0, path
        assert gw.terminate() == 0
    finally:
        node.loop_stop()
        collector.close()
        gw.kill()
        pole.stop()


def test_a_second_install_upgrades_and_keeps_the_configuration_and_the_secret(system):
    config = staged(system, "/etc/citynode/gateway.toml")
    secret = staged(system, "/etc/citynode/pole-broker.secret")
    config.write_text(config.read_text() + "# the operator's edit\n")
    edited, before = config.read_text(), secret.read_text()
    install(system)
    assert config.read_text() == edited
    assert secret.read_text() == before

"""`make install-gateway`, the Pi's install path (issue 12), staged with DESTDIR: every
file the shipped unit names is where the install puts it, the staged program, config
and secret work together, and a second run keeps the configuration and the secret.

The program comes from PyPI and this checkout, as on a pole (pip, in a virtualenv of
its own); nothing is started (DESTDIR: no apt, no systemctl)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from citynode import pole_broker

ROOT = Path(__file__).resolve().parents[1]
# builds from this checkout, as tests/test_wheel_install.py does: one at a time
pytestmark = pytest.mark.xdist_group("wheel")


def install(root: Path) -> str:
    run = subprocess.run(["make", "-s", "install-gateway", f"DESTDIR={root}",
                          f"PYTHON={sys.executable}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def staged(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def test_make_install_gateway_puts_everything_where_the_unit_expects_it(tmp_path):
    root = tmp_path / "root"
    install(root)
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
    # a second run (an upgrade) keeps what the operator edited and the secret
    before = secret.read_text()
    staged(root, "/etc/citynode/gateway.toml").write_text(text.replace("pole-0042", "pole-7"))
    install(root)
    assert secret.read_text() == before
    assert 'id = "pole-7"' in staged(root, "/etc/citynode/gateway.toml").read_text()

"""The package as a technician's laptop gets it: the built wheel, installed outside the
checkout, provisions an emulated board with its own console scripts.

Issue 12: installed from the wheel, `citynode-provision flash` failed with "cannot read
the board catalogue .../site-packages/boards.yaml" (it was found only in an editable
install). The dependencies come from this checkout's virtualenv (no network), the
package itself only from the wheel: nothing of the checkout is on the path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from citynode.testing.emulator import start_emulator
from citynode.testing.provisioning import operator_key, password_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("citynode-emu", "citynode-gateway", "citynode-ops", "citynode-provision")
# builds from this checkout, as tests/test_gateway_install.py does: one at a time
pytestmark = pytest.mark.xdist_group("wheel")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtualenv with the wheel in it; returns its bin/."""
    tmp = tmp_path_factory.mktemp("wheel")
    # built as pip builds it for a user: in isolation, with the build backend pyproject names
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True, capture_output=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("citynode-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, cwd=tmp)
    # then the dependencies: this virtualenv's site-packages as a plain path (its .pth
    # files, the editable install's finder among them, are not run), after the wheel's.
    # Only now: a pip that saw this checkout's install would uninstall it.
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv)}))
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv / "bin"


def _run(bin_dir: Path, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def test_the_wheel_carries_the_catalogue_the_firmware_and_the_scripts(installed, tmp_path):
    code = ("import json, citynode, citynode.boards as b, citynode.testing.emulator as e; "
            "print(json.dumps([citynode.__file__, sorted(b.load_catalogue()), "
            "(e.FIRMWARE / 'node' / 'app.py').is_file()]))")
    run = _run(installed, "python", "-c", code, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    where, boards, firmware = json.loads(run.stdout)
    assert where.startswith(str(installed.parent)) and not where.startswith(str(ROOT))
    assert "esp32-devkitc" in boards and firmware
    for script in SCRIPTS:
        run = _run(installed, script, "--help", cwd=tmp_path)
        assert run.returncode == 0 and "usage" in run.stdout.lower(), (script, run.stderr)
    # the operator's first step, as docs/operations.md gives it
    run = _run(installed, "citynode-ops", "--home", str(tmp_path / "ops"), "init", "--broker",
               "mqtt.city.example:8883", cwd=tmp_path)
    assert run.returncode == 0 and "operator key created" in run.stdout, run.stderr
    assert (tmp_path / "ops" / "operator.key.pem").stat().st_mode & 0o777 == 0o600


def test_the_installed_cli_provisions_a_blank_board(installed, tmp_path):
    """flash (esptool over RFC 2217), deploy (mpremote), keys and registry, all from the wheel."""
    image = tmp_path / "mp.bin"
    run = _run(installed, "citynode-emu", "image", "--board", "esp32-devkitc", "-o", str(image),
               cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    _, pem = operator_key(tmp_path)
    emu = start_emulator(tmp_path)
    try:
        run = _run(installed, "citynode-provision", "provision", "--port", emu.boards[0].url,
                   "--board", "esp32-devkitc", "--registry", str(tmp_path / "fleet"),
                   "--site", "w", "--pole", "W-1", "--broker", "127.0.0.1:1883",
                   "--wifi-ssid", "city", "--wifi-password-file", str(password_file(tmp_path)),
                   "--operator-key", str(pem), "--image", str(image), "--json",
                   cwd=tmp_path, timeout=600)
    finally:
        emu.stop()
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = [json.loads(ln) for ln in run.stdout.splitlines() if ln.startswith('{"result"')]
    board = result[-1]["result"]["boards"][0]
    assert board["steps"]["flash"] == "flashed"
    assert (tmp_path / "fleet").is_dir() and any((tmp_path / "fleet").rglob("*.json"))

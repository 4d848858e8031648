"""Errors a technician can act on: each test checks the exit code, the message, the fix,
and that nothing was changed where nothing should have been."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re

import pytest
import serial
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from citynode.provisioning import deploy, fleet, ports
from citynode.provisioning.errors import DeviceError, RegistryWriteError
from citynode.registry import DeviceRecord, load_registry, write_record
from citynode.testing.emulator import free_port, start_emulator
from citynode.testing.provisioning import (
    cli,
    firmware_tree,
    make_image,
    password_file,
    provision_args,
)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("errors")
    emu = start_emulator(tmp)
    yield {"tmp": tmp, "board": emu.boards[0], "fw": firmware_tree(tmp),
           "pw": password_file(tmp)}
    emu.stop()


def _fail(run, code: int, *words: str) -> str:
    assert run.code == code, (run.code, run.stdout, run.stderr)
    text = run.stdout + run.stderr
    for word in words:
        assert word in text, text
    return text


def _provision(env, registry, *extra, ports_=None):
    ports_ = ports_ or [env["board"].url]
    args = provision_args(ports_, registry, env["fw"], env["pw"], None, *extra)
    return cli(*[a for a in args if a != "--json"])


def test_no_port_and_wrong_port_path(env, tmp_path):
    run = cli("verify", "--port", "/dev/ttyUSB-none", "--registry", str(tmp_path))
    _fail(run, 3, "no serial port /dev/ttyUSB-none", "what to do:", "detect")
    run = _provision(env, tmp_path / "fleet", ports_=["/dev/ttyUSB-none"])
    _fail(run, 3, "no serial port /dev/ttyUSB-none")
    assert not (tmp_path / "fleet").exists()
    run = cli("verify", "--port", f"rfc2217://127.0.0.1:{free_port()}", "--registry",
              str(tmp_path), "--json")
    assert run.code == 3 and run.result["error"] == "port"
    assert "emulator) is running" in run.result["fix"]
    run = cli("provision", "--board", "esp32-devkitc", "--registry", str(tmp_path), "--site", "s",
              "--pole", "p", "--wifi-ssid", "x")
    _fail(run, 2, "no --port given", "--all")


def test_wrong_chip_image_is_refused_before_touching_the_board(env, tmp_path):
    flash_bin = env["board"].state / "flash.bin"
    before = hashlib.sha256(flash_bin.read_bytes()).hexdigest()
    s3 = make_image(tmp_path, "esp32-s3-devkitc")
    run = cli("flash", "--port", env["board"].url, "--board", "esp32-devkitc", "--image", str(s3))
    text = _fail(run, 4, "built for esp32s3", "esp32-s3-devkitc", "ESP32_GENERIC-v1.28.0.bin")
    assert "download mode" not in text  # refused before any reset
    assert hashlib.sha256(flash_bin.read_bytes()).hexdigest() == before
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    run = cli("flash", "--port", env["board"].url, "--board", "esp32-devkitc", "--image",
              str(not_an_image))
    _fail(run, 4, "not an ESP firmware image")


def test_board_not_entering_download_mode(env):
    # the pty has no DTR/RTS: esptool cannot reset the board into the ROM loader
    run = cli("flash", "--port", env["board"].link, "--board", "esp32-devkitc", "--image",
              str(make_image(env["tmp"])))
    _fail(run, 4, "did not enter ROM download mode", "hold BOOT")


def _other_key_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_device_registered_with_another_key_is_refused_unless_force_rekey(env, tmp_path):
    board, registry = env["board"], tmp_path / "fleet"
    device = f"cn-{board.mac}"
    stranger = DeviceRecord(device_id=device, alg="ES256", board="esp32-devkitc", site="old",
                            pole="P-0", lat=0.0, lon=0.0, firmware="0.0.1",
                            provisioned_at="2026-01-01T00:00:00Z",
                            public_key_pem=_other_key_pem())
    path = write_record(registry, stranger)
    before = path.read_bytes()
    run = _provision(env, registry)
    _fail(run, 6, f"{device} is already registered with another key", "--force-rekey")
    assert path.read_bytes() == before
    assert not (registry / "receipts").exists()

    run = _provision(env, registry, "--force-rekey")
    assert run.code == 0, run.stdout + run.stderr
    record = load_registry(registry, strict=True).get(device)
    assert record.public_key_pem != stranger.public_key_pem and record.site == "test"


def test_registry_not_writable(env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = env["board"].state / "fs" / "config.json"
    before = config.read_bytes() if config.exists() else None
    run = _provision(env, blocker / "fleet")
    _fail(run, 6, "is not writable", "--registry")
    after = config.read_bytes() if config.exists() else None
    assert after == before  # checked before the board was touched
    if os.getuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        _fail(_provision(env, ro), 6, "is not writable")


def test_registry_locked_by_another_writer(tmp_path):
    with fleet.locked(tmp_path), pytest.raises(RegistryWriteError, match="locked by another"):
        with fleet.locked(tmp_path, timeout=0.3):
            pass


def test_firmware_newer_than_the_boards_micropython(env, tmp_path):
    fw = firmware_tree(tmp_path)
    version = fw / "node" / "version.py"
    version.write_text(re.sub(r"MIN_MICROPYTHON = \([^)]*\)", "MIN_MICROPYTHON = (9, 0, 0)",
                              version.read_text()))
    run = cli("deploy", "--port", env["board"].url, "--board", "esp32-devkitc", "--site", "s",
              "--pole", "p", "--wifi-ssid", "x", "--firmware-dir", str(fw))
    _fail(run, 5, "the firmware needs >= 9.0.0", "flash a newer MicroPython")


def test_an_older_micropython_is_refused_with_what_to_flash():
    """The minimum comes from the firmware's own version.py; a board below it is told
    which release it runs, which it needs, and how to get there."""
    fw = deploy.firmware_dir()
    need = deploy.min_micropython(fw)
    assert need == (1, 28, 0)
    with pytest.raises(DeviceError) as err:
        deploy.check_micropython(fw, {"micropython": [1, 27, 0]})
    assert "runs MicroPython 1.27.0" in err.value.message
    assert "needs >= 1.28.0" in err.value.message
    assert "citynode-provision flash" in err.value.fix
    deploy.check_micropython(fw, {"micropython": [1, 28, 0]})


def test_port_busy(env):
    with serial.Serial(env["board"].link, exclusive=True):
        run = cli("verify", "--port", env["board"].link, "--registry", str(env["tmp"]))
    _fail(run, 3, "is busy", "fuser")


def test_permission_denied_message_names_the_fix():
    exc = ports.open_error("/dev/ttyUSB0", OSError(errno.EACCES, "Permission denied"))
    assert "permission denied on /dev/ttyUSB0" in exc.message
    assert "usermod -aG" in exc.fix and "log out" in exc.fix


def test_board_without_micropython(tmp_path):
    emu = start_emulator(tmp_path, blank=True)
    board = emu.boards[0]
    try:
        run = cli("deploy", "--port", board.url, "--board", "esp32-devkitc", "--site", "s",
                  "--pole", "p", "--wifi-ssid", "x", "--json")
        assert run.code == 5 and run.result["error"] == "no-micropython"
        assert "ROM boot error loop" in run.result["message"]
        assert "citynode-provision flash" in run.result["fix"]
        fw, pw = firmware_tree(tmp_path), password_file(tmp_path)
        run = cli(*provision_args([board.url], tmp_path / "fleet", fw, pw, None, "--no-flash"))
        assert run.code == 5, run.stdout
        assert json.loads(run.stdout.splitlines()[-1])["result"]["boards"][0]["error"][
            "error"] == "no-micropython"
        assert not list((board.state / "fs").rglob("config.json"))
    finally:
        emu.stop()

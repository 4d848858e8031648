"""The single commands a technician uses outside `provision`: detect, deploy, keys (with the
operator key and the HMAC option), verify, rotate, revoke - on one emulated board."""

from __future__ import annotations

import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from citynode.registry import load_registry
from citynode.testing.emulator import start_emulator
from citynode.testing.provisioning import PASSWORD, cli, firmware_tree


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("commands")
    emu = start_emulator(tmp)
    board = emu.boards[0]
    yield {"tmp": tmp, "board": board, "fw": firmware_tree(tmp), "registry": tmp / "fleet",
           "device": f"cn-{board.mac}"}
    emu.stop()


def _ok(run):
    assert run.code == 0, run.stdout + run.stderr
    return run.result


def test_detect_reports_chip_mac_flash_and_micropython(env):
    row = _ok(cli("detect", "--port", env["board"].url, "--json"))["ports"][0]
    assert row["chip"] == "esp32" and row["mac"] == env["board"].mac
    assert row["flash_size"] == 4 * 1024 * 1024
    assert row["micropython"] == "1.29.0" and row["provisioned"] is False


def test_single_commands_in_a_technicians_order(env, tmp_path):
    """deploy -> keys -> verify -> rotate -> revoke -> keys --hmac, each on the same board:
    one test, because each step needs the one before."""
    _deploy_copies_once_then_nothing(env)
    _keys_register_and_install_the_operator_key(env, tmp_path)
    _verify_rotate_revoke(env)
    _hmac_option_registers_a_secret_kept_beside_the_registry(env, tmp_path)


def _deploy_copies_once_then_nothing(env):
    args = ["deploy", "--port", env["board"].url, "--board", "esp32-devkitc", "--site", "test",
            "--pole", "P-2", "--lat", "48.2", "--lon", "16.37", "--wifi-ssid", "city",
            "--wifi-password-env", "CN_TEST_PW", "--firmware-dir", str(env["fw"]), "--json"]
    first = _ok(cli(*args, env={"CN_TEST_PW": PASSWORD}))
    assert first["compiled_mpy"] is True and "/config.json" in first["written"]
    assert "/secret/wifi.json" in first["written"]
    second = _ok(cli(*args, env={"CN_TEST_PW": PASSWORD}))
    assert second["written"] == [] and second["unchanged"] == len(first["written"])
    run = cli(*args[:-1], env={"CN_TEST_PW": PASSWORD})  # human output
    assert "already current, nothing copied" in run.stdout
    assert PASSWORD not in run.stdout + run.stderr


def _keys_register_and_install_the_operator_key(env, tmp_path):
    operator = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = tmp_path / "operator.pem"
    pem.write_bytes(operator.public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    args = ["keys", "--port", env["board"].url, "--board", "esp32-devkitc", "--registry",
            str(env["registry"]), "--operator-key", str(pem), "--json"]
    first = _ok(cli(*args))
    # the key is made on the node: by this command, or already by the app at its start
    assert first["registry"] == "created"
    record = load_registry(env["registry"], strict=True).get(env["device"])
    assert (record.site, record.pole, record.lat, record.lon) == ("test", "P-2", 48.2, 16.37)
    on_node = (env["board"].state / "fs" / "secret" / "operator.pub").read_bytes()
    assert on_node == operator.public_bytes(serialization.Encoding.X962,
                                            serialization.PublicFormat.UncompressedPoint)
    second = _ok(cli(*args))
    assert second["key_created"] is False and second["registry"] == "unchanged"
    assert second["key_fingerprint"] == first["key_fingerprint"]


def _verify_rotate_revoke(env):
    verified = _ok(cli("verify", "--port", env["board"].url, "--registry", str(env["registry"]),
                       "--json"))
    assert verified["verified"] is True and verified["device"] == env["device"]
    old_pem = load_registry(env["registry"], strict=True).get(env["device"]).public_key_pem

    rotated = _ok(cli("rotate", env["device"], "--port", env["board"].url, "--registry",
                      str(env["registry"]), "--json"))
    assert rotated["verified"] is True
    assert rotated["key_fingerprint"] != verified["key_fingerprint"]
    record = load_registry(env["registry"], strict=True).get(env["device"])
    # the new key, and the old one kept for what the node signed before it switched
    assert record.public_key_pem != old_pem and record.rollover_public_key_pem == old_pem
    assert record.rollover_until > record.provisioned_at

    revoked = _ok(cli("revoke", env["device"], "--registry", str(env["registry"]), "--json"))
    assert revoked["status"] == "revoked"
    run = cli("verify", "--port", env["board"].url, "--registry", str(env["registry"]))
    assert run.code == 7 and "revoked" in run.stderr and "rotate" in run.stderr
    run = cli("revoke", "cn-000000000000", "--registry", str(env["registry"]))
    assert run.code == 6 and "not in the registry" in run.stderr


def _hmac_option_registers_a_secret_kept_beside_the_registry(env, tmp_path):
    registry = tmp_path / "hmac-fleet"
    result = _ok(cli("keys", "--port", env["board"].url, "--board", "esp32-devkitc",
                     "--registry", str(registry), "--hmac", "--json"))
    record = load_registry(registry, strict=True).get(env["device"])
    assert record.alg == "HMAC256" and record.key_ref == f"secrets/{env['device']}.hex"
    secret_file = registry / record.key_ref
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    on_node = (env["board"].state / "fs" / "secret" / "hmac.key").read_bytes()
    assert bytes.fromhex(secret_file.read_text().strip()) == on_node
    assert on_node.hex() not in str(result)

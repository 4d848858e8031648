"""A factory-blank board through the whole path, then the same command again.

flash (ROM download mode over rfc2217) -> deploy -> key on the node -> registry ->
signed self-test verified with citynode/wire.py. The node's private key must not
exist anywhere on the host afterwards, and neither may the Wi-Fi password.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from citynode import pole_broker, wire
from citynode.provisioning.device import last_json
from citynode.registry import load_registry
from citynode.testing.emulator import mpremote, start_emulator
from citynode.testing.provisioning import (
    PASSWORD,
    cli,
    firmware_tree,
    make_image,
    password_file,
    provision_args,
)

# one worker takes the module (make test's --dist loadgroup): its board is provisioned once
pytestmark = pytest.mark.xdist_group("provision-blank")

SELFTEST = ("from node import p256\np256.precompute()\nimport node.selftest\n"
            "node.selftest.main()")


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory):
    """One blank board provisioned once; the tests below inspect the outcome."""
    tmp = tmp_path_factory.mktemp("blank")
    emu = start_emulator(tmp, blank=True)
    board = emu.boards[0]
    registry, logs = tmp / "fleet", tmp / "logs"
    args = provision_args([board.url], registry, firmware_tree(tmp), password_file(tmp),
                          make_image(tmp))
    first = cli(*args, logs=logs)
    second = cli(*args, logs=logs)
    yield {"tmp": tmp, "board": board, "registry": registry, "first": first, "second": second,
           "args": args, "logs": logs}
    emu.stop()


def test_blank_board_is_flashed_deployed_keyed_and_registered(provisioned):
    first, board = provisioned["first"], provisioned["board"]
    assert first.code == 0, first.stdout + first.stderr
    result = first.result["boards"][0]
    device = f"cn-{board.mac}"
    assert result["device"] == device and result["status"] == "provisioned"
    assert result["steps"] == {"flash": "flashed", "deploy": result["steps"]["deploy"],
                               "keys": "created", "registry": "created", "verify": "ok"}
    steps = [(e["step"], e["state"]) for e in first.events]
    for expected in [("detect", "info"), ("flash", "done"), ("deploy", "done"), ("keys", "done"),
                     ("register", "done"), ("verify", "done"), ("receipt", "done")]:
        assert expected in steps, steps
    assert steps.index(("flash", "done")) < steps.index(("deploy", "done")) < \
        steps.index(("keys", "done")) < steps.index(("verify", "done"))
    record = load_registry(provisioned["registry"], strict=True).get(device)
    assert record is not None and record.alg == "ES256" and record.active
    assert (record.board, record.site, record.pole) == ("esp32-devkitc", "test", "P-1")
    # the modules are compiled and in the ROMFS partition (run in place from flash),
    # not on the filesystem; main.py is
    fs = board.state / "fs"
    assert not (fs / "node").exists() and (fs / "main.py").exists()
    assert json.loads((fs / "romfs.json").read_text())["sha256"]
    assert "/rom" in mpremote(board.link, "exec", "import node.p256; print(node.p256.__file__)")
    config = json.loads((fs / "config.json").read_text())
    assert config["device"] == device and config["wifi"] == {"ssid": "city"}
    assert config["broker"] == {"host": "127.0.0.1", "port": 1883}
    assert json.loads((fs / "secret" / "wifi.json").read_text()) == {"password": PASSWORD}
    # the pole broker's password: made for this node, on the node, its hash in the registry
    broker_password = json.loads((fs / "secret" / "broker.json").read_text())["password"]
    assert len(broker_password) >= 32
    assert pole_broker.secret_matches(broker_password, record.broker_hash)
    told = first.stdout + first.stderr + "".join(
        p.read_text(errors="replace") for p in provisioned["logs"].rglob("*") if p.is_file())
    assert broker_password not in told and PASSWORD not in told
    # the deliberate reset at the end does not count as a crash-reboot (node/safemode.py):
    # the counter holds the boots since, far from safe mode
    assert int((fs / "data" / "bootcrash").read_bytes()) < 3


def test_self_test_envelope_verifies_with_the_registry_key(provisioned):
    """Independently of the CLI: unmodified mpremote, then the gateway's decoder."""
    board, registry = provisioned["board"], provisioned["registry"]
    device = f"cn-{board.mac}"
    out = mpremote(board.link, "exec", SELFTEST)
    report = last_json(out)
    record = load_registry(registry, strict=True).get(device)
    key = load_pem_public_key(record.public_key_pem.encode())
    envelope = wire.decode_envelope(bytes.fromhex(report["envelope"]))
    wire.verify_es256(envelope, key)
    payload = wire.decode_payload(envelope)
    assert envelope.kid == payload.device == report["device"] == device
    # a tampered envelope must fail with the same key (the check above is not vacuous)
    forged = wire.Envelope(envelope.alg, envelope.kid, envelope.protected,
                           envelope.payload + b"\x00", envelope.signature)
    with pytest.raises(wire.EnvelopeError):
        wire.verify_es256(forged, key)


def test_receipt_is_signed_by_the_node(provisioned):
    board, registry = provisioned["board"], provisioned["registry"]
    device = f"cn-{board.mac}"
    receipts = sorted((registry / "receipts").glob(f"{device}-*.json"))
    assert len(receipts) == 1
    saved = json.loads(receipts[0].read_text())
    envelope = wire.decode_envelope(bytes.fromhex(saved["envelope"]))
    record = load_registry(registry, strict=True).get(device)
    wire.verify_es256(envelope, load_pem_public_key(record.public_key_pem.encode()))
    signed = json.loads(envelope.payload)
    assert signed == saved["receipt"]
    assert signed["mac"] == board.mac and signed["device"] == device
    image = provisioned["tmp"] / "mp-esp32-devkitc.bin"
    assert signed["image_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert len(signed["files_sha256"]) == 64 and signed["technician"]
    labels = registry / "labels"
    assert (labels / f"{device}.svg").read_text().count(device) >= 1
    assert (labels / f"{device}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_is_a_noop_and_says_so(provisioned):
    second, registry = provisioned["second"], provisioned["registry"]
    assert second.code == 0, second.stdout + second.stderr
    result = second.result
    assert result["unchanged"] is True
    board = result["boards"][0]
    assert board["status"] == "unchanged"
    assert board["steps"]["flash"] == "kept" and board["steps"]["deploy"] == "unchanged"
    assert board["steps"]["keys"] == "existing" and board["steps"]["registry"] == "unchanged"
    assert any("nothing changed" in e.get("message", "") for e in second.events)
    assert len(list((registry / "receipts").glob("*.json"))) == 1  # no second receipt
    # nothing was written anywhere: no flash, no file copied, no registry write
    # (its speed, <= 5 s, is bench/provision.py's reprovision_s: a wall-clock bound
    # here would be flaky on a shared CI machine)
    states = {(e["step"], e["state"]) for e in second.events}
    assert not states & {("flash", "start"), ("deploy", "start"), ("register", "done"),
                         ("receipt", "done"), ("label", "done")}, states


def _needles(secret: bytes) -> list[bytes]:
    n = int.from_bytes(secret, "big")
    return [secret, secret.hex().encode(), secret.hex().upper().encode(),
            base64.b64encode(secret), base64.b64encode(secret).rstrip(b"="), str(n).encode()]


def test_private_key_and_password_never_reach_the_host(provisioned):
    """Search every file the run produced: registry, receipts, labels, CLI output, emulator logs."""
    board, tmp = provisioned["board"], provisioned["tmp"]
    node_fs = board.state / "fs"
    private = (node_fs / "secret" / "node.key").read_bytes()  # the board's own flash
    assert len(private) == 32
    needles = _needles(private) + [PASSWORD.encode()]
    searched = 0
    for path in Path(tmp).rglob("*"):
        if not path.is_file() or node_fs in path.parents or path.name == "flash.bin":
            continue
        if path.name == "wifi.pw":  # the technician's own password file
            continue
        data = path.read_bytes()
        searched += 1
        for needle in needles:
            assert needle not in data, f"{path} contains a secret"
    assert searched >= 8
    # and not in the arguments the CLI was started with
    assert not any(PASSWORD in a for a in provisioned["args"])

"""A key rollover loses nothing (issue 12): the registry accepts a node's next key beside
its current one before the node switches, so every envelope it signs verifies, and
keeps the old key only until `rollover_until`. The node's side (next key, switch) is
tested in test_firmware_crypto.py and test_firmware_signer.py; the cable's in
test_provision_commands.py."""

from __future__ import annotations

import json
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from citynode import registry, wire
from citynode.gateway.pole import _Pending
from citynode.provisioning.cli import main as provision_main
from citynode.testing.gateway import pole_link
from citynode.testing.keys import TestDevice

NODE = "cn-0123456789d0"


def pem_of(key: ec.EllipticCurvePrivateKey) -> str:
    return TestDevice(NODE, key=key).record().public_key_pem or ""


def receive(link, device: TestDevice, data: bytes) -> None:
    item = link.handle(wire.up_topic(device.device_id), data, time.time())
    link.commit([_Pending(item, 1, qos=0, generation=0)])


def test_both_keys_verify_during_the_rollover_each_with_its_window(tmp_path):
    node = TestDevice(NODE)
    link, metrics, store = pole_link(tmp_path, [node])
    old_key, next_key = node.key, ec.generate_private_key(ec.SECP256R1())
    receive(link, node, node.envelope())                       # seq 1, old key
    registry.rollover(tmp_path / "registry", NODE, pem_of(next_key), keep_old_s=3600)
    link.verifier.registry.load()
    receive(link, node, node.envelope())                       # seq 2: not switched yet
    node.key = next_key
    receive(link, node, node.envelope())                       # seq 3: switched
    node.key, node.seq = old_key, 10
    receive(link, node, node.envelope())                       # spooled before the switch
    assert {(r.device, r.seq) for r in store.scan()} == {(NODE, s) for s in (1, 2, 3, 11)}
    assert metrics.total("rejected_total") == 0
    # the next key's window is its own: its seq 1 (a node that restarts its count) passes
    node.key = next_key
    receive(link, node, node.envelope(seq=1))
    assert len(store.scan()) == 5 and metrics.total("rejected_total") == 0


def test_the_old_key_is_refused_once_its_time_is_up(tmp_path):
    node = TestDevice(NODE)
    link, metrics, store = pole_link(tmp_path, [node])
    old_key, next_key = node.key, ec.generate_private_key(ec.SECP256R1())
    record = registry.rollover(tmp_path / "registry", NODE, pem_of(next_key), keep_old_s=3600)
    assert record.rollover_public_key_pem == TestDevice(NODE, key=old_key).record().public_key_pem
    path = tmp_path / "registry" / f"{NODE}.json"
    data = json.loads(path.read_text())
    data["rollover_until"] = "2020-01-01T00:00:00Z"             # an hour later, say
    path.write_text(json.dumps(data))
    link.verifier.registry.load()
    receive(link, node, node.envelope())
    assert metrics.value("rejected_total", reason="bad_signature") == 1
    node.key = next_key
    receive(link, node, node.envelope())
    assert len(store.scan()) == 1


def test_a_stolen_key_can_be_refused_at_once_and_a_rerun_changes_nothing(tmp_path):
    node = TestDevice(NODE)
    node.register(tmp_path)
    new = pem_of(ec.generate_private_key(ec.SECP256R1()))
    first = registry.rollover(tmp_path, NODE, new, keep_old_s=0)
    assert first.public_key_pem == new and first.rollover_public_key_pem is None
    node_keys = registry.load_registry(tmp_path).credentials_for(NODE, "ES256")
    assert len(node_keys) == 1
    with pytest.raises(wire.EnvelopeError, match="bad_signature"):
        registry.load_registry(tmp_path).verify(wire.decode_envelope(node.envelope()))
    # asked again with the same key (a re-run after a break): nothing changes
    again = registry.rollover(tmp_path, NODE, new, keep_old_s=3600)
    assert again == first


@pytest.mark.parametrize(("change", "message"), [
    ({"rollover_public_key_pem": "PEM"}, "is not a PEM public key"),
    ({"rollover_until": "soon"}, "must be an ISO 8601 time"),
    ({"rollover_until": "2026-12-31T00:00:00"}, "needs its time zone"),
])
def test_a_bad_rollover_record_says_what_to_fix(tmp_path, change, message):
    data = TestDevice(NODE).record().to_dict()
    data.update({"rollover_public_key_pem": data["public_key_pem"],
                 "rollover_until": "2026-12-31T00:00:00Z"} | change)
    with pytest.raises(registry.RegistryError, match=message):
        registry.record_from_dict(data, "r.json")
    del data["rollover_until"]
    if "rollover_public_key_pem" not in change:
        with pytest.raises(registry.RegistryError, match="needs 'rollover_until'"):
            registry.record_from_dict(data, "r.json")


def test_the_rollover_command_takes_the_nodes_answer(tmp_path, capsys):
    node = TestDevice(NODE)
    node.register(tmp_path)
    next_key = ec.generate_private_key(ec.SECP256R1())
    answer = next_key.public_key().public_bytes(               # the node's "next <hex>"
        Encoding.X962, PublicFormat.UncompressedPoint).hex()
    code = provision_main(["rollover", NODE, "--registry", str(tmp_path), "--key", answer,
                           "--keep-old-days", "2", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["result"]
    assert code == 0 and result["ok"] and result["rollover_until"]
    keys = registry.load_registry(tmp_path).credentials_for(NODE, "ES256")
    assert len(keys) == 2
    assert provision_main(["rollover", NODE, "--registry", str(tmp_path), "--key",
                           "04abcd"]) == 2
    assert "is not a P-256 public key" in capsys.readouterr().err

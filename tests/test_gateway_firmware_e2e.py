"""End to end with envelopes the FIRMWARE signs: node code on MicroPython -> gateway -> city.

The envelopes come from firmware/node/ (payload.encode_payload, cose.sign1 / cose.mac0,
keys.NodeKeys, seqno.Sequence) running on the real MicroPython unix port with the
ESP32 heap, in a node filesystem of its own: the key is born there and only its public
half is read back, as the provisioning CLI does. Two boots of the same node, so the
sequence numbers jump a reserved block as after a real reset. The host then registers
the device, publishes as a node would (QoS 1 on `citynode/up/<device>`) and checks, on
the upstream broker, that every envelope arrived byte-identical and in order and still
verifies with citynode.wire and with pycose (an independent COSE implementation).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pycose.keys import EC2Key, SymmetricKey
from pycose.messages import Mac0Message, Sign1Message

from citynode import wire
from citynode.provisioning.cli import main as provision_main
from citynode.registry import DeviceRecord, write_record
from citynode.testing.gateway import GATEWAY_ID, PREFIX, Collector, GatewayProcess, Node
from citynode.testing.keys import seq_of
from citynode.testing.micropython import run_micropython

ES256_DEVICE = "cn-f1a0c0de0001"
HMAC_DEVICE = "cn-f1a0c0de0002"
HMAC_SECRET = bytes(range(32))
REPLAY_WINDOW = 64  # the gateway's smallest window: one firmware block (seqno.BLOCK)

NODE_SCRIPT = """
import os
os.chdir({root!r})
import time
from node import cose, keys, payload, seqno
device, alg = {device!r}, {alg!r}
k = keys.NodeKeys('secret')
if alg == 'ES256':
    k.create()
if alg == 'HMAC256' and not k.has_hmac_secret():
    k.set_hmac_secret({secret!r})
if {key_step!r} == 'next':
    print('next', k.next_key().hex())
if {key_step!r} == 'commit':
    k.commit_next()
s = seqno.Sequence('data')
print('pub', k.public_key_hex() if alg == 'ES256' else '-')
for i in range({count}):
    seq = s.next()
    kind = payload.KIND_EVENT if i == {event_at} else payload.KIND_READINGS
    records = [('light/lux', 'lx', 412.5 + i), ('noise/laeq', 'dBA', 61.25),
               ('air/pm2_5', 'ug/m3', 12.5)]
    raw = payload.encode_payload(device, seq, s.boot, 60000 * (i + 1), kind, records,
                                 time.time_ns() // 1000000)   # as a synced node stamps
    env = cose.sign1(raw, device, k) if alg == 'ES256' else cose.mac0(raw, device, k)
    print('env', env.hex())
"""


@dataclass
class FirmwareNode:
    """One node's filesystem on the host; each `boot()` runs the firmware code once."""

    root: Path
    device: str
    alg: str = "ES256"
    public_key: bytes = b""
    next_key: bytes = b""                   # a key rollover's next key, once asked for
    envelopes: list[bytes] = field(default_factory=list)

    def boot(self, count: int, event_at: int = -1, key_step: str = "") -> list[bytes]:
        """`key_step` "next": the node makes its next key first; "commit": switches to it."""
        self.root.mkdir(parents=True, exist_ok=True)
        out = run_micropython(NODE_SCRIPT.format(
            root=str(self.root), device=self.device, alg=self.alg, secret=HMAC_SECRET,
            count=count, event_at=event_at, key_step=key_step))
        fresh: list[bytes] = []
        for line in out.splitlines():
            tag, _, value = line.partition(" ")
            if tag == "pub" and value != "-":
                self.public_key = bytes.fromhex(value)
            elif tag == "next":
                self.next_key = bytes.fromhex(value)
            elif tag == "env":
                fresh.append(bytes.fromhex(value))
        assert len(fresh) == count, out
        self.envelopes += fresh
        return fresh

    def register(self, registry: Path) -> None:
        """The record the provisioning CLI would write from what the node reported."""
        pem = key_ref = None
        if self.alg == "ES256":
            pem = self.ec_key().public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        else:
            key_ref = f"keys/{self.device}.hex"
            (registry / "keys").mkdir(parents=True, exist_ok=True)
            (registry / key_ref).write_text(HMAC_SECRET.hex())
        write_record(registry, DeviceRecord(
            device_id=self.device, alg=self.alg, board="esp32-devkitc", site="test",
            pole="pole-1", lat=48.2, lon=16.37, firmware="0.1.0",
            provisioned_at="2026-11-23T12:00:00Z", public_key_pem=pem, key_ref=key_ref))

    def ec_key(self) -> ec.EllipticCurvePublicKey:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), self.public_key)

    def verify(self, data: bytes) -> None:
        """Check one envelope with citynode.wire and with pycose."""
        envelope = wire.decode_envelope(data)
        assert envelope.kid == self.device
        if self.alg == "ES256":
            assert len(self.public_key) == 65
            wire.verify_es256(envelope, self.ec_key())
            msg = Sign1Message.decode(data)
            msg.key = EC2Key(crv="P_256", x=self.public_key[1:33], y=self.public_key[33:])
            assert msg.verify_signature()
        else:
            wire.verify_hmac(envelope, HMAC_SECRET)
            mac = Mac0Message.decode(data)
            mac.key = SymmetricKey(k=HMAC_SECRET)
            assert mac.verify_tag()


def forge(data: bytes) -> bytes:
    """The same envelope with one payload byte flipped (the last byte of a float reading),
    so it still parses and only the signature can tell."""
    payload = wire.decode_envelope(data).payload
    at = data.index(payload) + len(payload) - 1
    forged = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]
    assert wire.decode_payload(wire.decode_envelope(forged)).device  # still well formed
    return forged


@pytest.fixture
def nodes(tmp_path):
    """Two nodes, two boots each: boot 2 starts a reserved block (64) above boot 1."""
    es = FirmwareNode(tmp_path / "node-es256", ES256_DEVICE)
    hm = FirmwareNode(tmp_path / "node-hmac", HMAC_DEVICE, "HMAC256")
    es.boot(12, event_at=5)
    hm.boot(4)
    es.boot(10)
    hm.boot(3)
    return es, hm


def test_firmware_signed_envelopes_arrive_untouched_verified_in_order(
        tmp_path, local_broker, upstream_broker, nodes):
    es, hm = nodes
    assert [seq_of(e)[1] for e in es.envelopes] == list(range(12)) + list(range(64, 74))
    gw = GatewayProcess(tmp_path / "gw", local_broker, upstream_broker,
                        store={"replay_window": REPLAY_WINDOW})
    for node in nodes:
        node.register(gw.registry)
    collector, node_client = Collector(upstream_broker), Node(local_broker)
    try:
        gw.start()
        gw.wait_for(lambda: gw.health()["uplink"] == "up", what="uplink up")
        # the ES256 node's last envelope is held back as a sentinel for the rejections
        *sent_es, sentinel = es.envelopes
        sent = [(ES256_DEVICE, e) for e in sent_es] + [(HMAC_DEVICE, e) for e in hm.envelopes]
        node_client.publish_all(sent)  # QoS 1: every PUBACK came after the gateway's commit
        gw.wait_for(lambda: len(collector.envelopes()) >= len(sent), what="forwarding")

        got = collector.envelopes()
        assert len(got) == len(sent)
        by_device: dict[str, list[bytes]] = {}
        for topic, data, props in got:
            device = wire.decode_envelope(data).kid
            assert topic == f"{PREFIX}/{GATEWAY_ID}/up/{device}"
            assert props["gateway"] == GATEWAY_ID and props["historical"] == "0"
            by_device.setdefault(device, []).append(data)
        assert by_device[ES256_DEVICE] == sent_es  # byte-identical, same order
        assert by_device[HMAC_DEVICE] == hm.envelopes
        for data in by_device[ES256_DEVICE]:
            es.verify(data)
        for data in by_device[HMAC_DEVICE]:
            hm.verify(data)
        kinds = [wire.decode_payload(wire.decode_envelope(d)).kind for d in sent_es]
        assert kinds.count(wire.KIND_EVENT) == 1

        # a forged copy, a duplicate (inside the replay window) and a replay of boot 1
        # (older than the window): each acknowledged to the node, counted, never forwarded
        forged = forge(sent_es[-1])
        with pytest.raises(wire.EnvelopeError):
            es.verify(forged)
        node_client.publish(ES256_DEVICE, forged)
        node_client.publish(ES256_DEVICE, sent_es[-1])
        node_client.publish(ES256_DEVICE, sent_es[0])
        node_client.publish(ES256_DEVICE, sentinel)
        gw.wait_for(lambda: len(collector.envelopes()) >= len(sent) + 1, what="sentinel")
        assert collector.envelopes()[-1][1] == sentinel
        assert len(collector.envelopes()) == len(sent) + 1
        es.verify(sentinel)
        assert gw.metric("rejected_total", reason="bad_signature") == 1
        assert gw.metric("rejected_total", reason="duplicate") == 1
        assert gw.metric("rejected_total", reason="replayed") == 1
        assert gw.metric("rejected_total") == 3
        assert gw.metric("forwarded_total") == len(sent) + 1
        gw.wait_for(lambda: gw.metric("buffered_messages") == 0, what="buffer emptied")
        assert gw.terminate() == 0
    finally:
        gw.kill()
        node_client.close()
        collector.close()


def test_a_key_rollover_loses_no_envelope(tmp_path, local_broker, upstream_broker):
    """The firmware's two phases against the real gateway: the node names its next key
    and keeps signing with its current one; the operator registers the next key
    (citynode-provision rollover) and the gateway reloads; the node switches. What it
    signed before, during and after, spooled and sent late, all reaches the city."""
    node = FirmwareNode(tmp_path / "node", ES256_DEVICE)
    before = node.boot(3)
    old_key = node.public_key
    gw = GatewayProcess(tmp_path / "gw", local_broker, upstream_broker)
    node.register(gw.registry)
    collector, node_client = Collector(upstream_broker), Node(local_broker)
    try:
        gw.start()
        gw.wait_for(lambda: gw.health()["uplink"] == "up", what="uplink up")
        node_client.publish_all([(ES256_DEVICE, e) for e in before])
        during = node.boot(3, key_step="next")          # spooled: the uplink is down
        assert node.public_key == old_key and node.next_key not in (b"", old_key)
        assert provision_main(["rollover", ES256_DEVICE, "--registry", str(gw.registry),
                               "--key", node.next_key.hex(), "--keep-old-days", "1"]) == 0
        gw.signal(signal.SIGHUP)
        gw.wait_for(lambda: gw.metric("registry_reloads_total") == 1, what="reload")
        after = node.boot(3, key_step="commit")
        assert node.public_key == node.next_key
        node_client.publish_all([(ES256_DEVICE, e) for e in during + after])
        gw.wait_for(lambda: len(collector.envelopes()) >= 9, what="forwarding")
        assert [d for _, d, _ in collector.envelopes()] == before + during + after
        assert gw.metric("rejected_total") == 0
        for data in after:                               # signed with the next key only
            node.verify(data)
        node.public_key = old_key
        for data in before + during:
            node.verify(data)
        with pytest.raises(wire.EnvelopeError):
            node.verify(after[0])
    finally:
        gw.kill()
        node_client.close()
        collector.close()

"""The pole's broker as deploy/ ships it refuses every attack from the pole's Wi-Fi.

A real Mosquitto runs deploy/mosquitto.conf and deploy/mosquitto.acl (listeners moved to
loopback ports, paths into tmp_path: citynode.mosquitto.PoleBroker) with accounts written
by citynode.pole_broker. The attacker is a paho client on the nodes' listener, either
with no account or with a real node's account (a node that was taken apart: its flash
holds its password).
"""

from __future__ import annotations

import json
import random
import re
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from citynode import pole_broker as pb
from citynode import wire
from citynode.gateway.config import credential
from citynode.mosquitto import DEPLOY, PoleBroker
from citynode.registry import write_record
from citynode.subscriber import Subscriber
from citynode.testing.gateway import Collector, GatewayProcess
from citynode.testing.keys import TestDevice, seq_of

BIN = Path(sys.executable).parent

NODE_A, NODE_B = "cn-a0a0a0a0a0a0", "cn-b0b0b0b0b0b0"
SECRETS = {pb.GATEWAY_USER: pb.new_secret(), NODE_A: pb.new_secret(), NODE_B: pb.new_secret()}


class Refused(Exception):
    pass


class Client:
    """A paho client that connects (or raises Refused with the broker's reason) and
    records whether the broker dropped it."""

    def __init__(self, port: int, user: str | None, secret: str | None, client_id: str = "",
                 clean: bool = True):
        self.connected = threading.Event()
        self.dropped = threading.Event()
        self.reason: object = None
        self.suback: list = []
        self.got: list[tuple[str, bytes]] = []
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"x{id(self)}",
                             clean_session=clean)
        if user is not None:
            self.c.username_pw_set(user, secret)
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = lambda *a: self.dropped.set()
        self.c.on_subscribe = lambda c, u, mid, codes, p: self.suback.extend(codes)
        self.c.on_message = lambda c, u, m: self.got.append((m.topic, m.payload))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        deadline = time.monotonic() + 5
        while not (self.connected.is_set() or self.dropped.is_set()):
            if time.monotonic() > deadline:
                raise AssertionError("no CONNACK within 5 s")
            time.sleep(0.01)
        if not self.connected.is_set():
            self.close()
            raise Refused(self.reason)

    def _on_connect(self, c, userdata, flags, reason, props) -> None:
        self.reason = reason
        if not reason.is_failure:
            self.connected.set()
        else:
            self.dropped.set()

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def subscribe(self, topic: str) -> list:
        self.suback.clear()
        self.c.subscribe(topic, qos=1)
        deadline = time.monotonic() + 5
        while not self.suback and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.suback)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def pole(tmp_path):
    broker = PoleBroker(tmp_path / "pole")
    broker.passwd.write_text(pb.password_file_text(
        (user, pb.hash_secret(secret)) for user, secret in SECRETS.items()))
    with broker:
        yield broker


def login(broker: PoleBroker, user: str) -> tuple[str, str]:
    return user, SECRETS[user]


def gateway_watch(broker: PoleBroker) -> Subscriber:
    return Subscriber(broker.host, broker.port, "citynode/up/+",
                      login=login(broker, pb.GATEWAY_USER))


def test_no_account_no_entry(pole):
    with pytest.raises(Refused, match="Not authorized"):
        Client(pole.node_port, None, None)
    with pytest.raises(Refused, match="Not authorized"):
        Client(pole.node_port, NODE_A, SECRETS[NODE_B])          # another node's password
    with pytest.raises(Refused, match="Not authorized"):
        Client(pole.node_port, "cn-c0c0c0c0c0c0", SECRETS[NODE_A])  # a made-up node


def test_a_node_speaks_only_for_itself(pole):
    watch = gateway_watch(pole)
    node = Client(pole.node_port, *login(pole, NODE_A))
    try:
        node.publish("citynode/up/" + NODE_B, b"forged")          # as another node
        node.publish("citynode/up/" + NODE_A, b"own")
        watch.wait_count(1)
        time.sleep(0.3)
    finally:
        node.close()
        watch.close()
    assert watch.messages == [("citynode/up/" + NODE_A, b"own")]


def test_a_node_reads_only_its_own_commands_and_cannot_send_any(pole):
    # Mosquitto 2.0 grants any subscription and checks read access on each delivery.
    victim = Client(pole.node_port, *login(pole, NODE_B))
    node = Client(pole.node_port, *login(pole, NODE_A))
    gateway = Client(pole.port, *login(pole, pb.GATEWAY_USER))
    try:
        victim.subscribe("citynode/down/" + NODE_B)
        for spied in ("citynode/up/+", "citynode/down/+", "#"):
            node.subscribe(spied)
        node.publish("citynode/down/" + NODE_B, b"reboot")        # a forged downlink
        victim.publish("citynode/up/" + NODE_B, b"reading")      # what a spy would read
        gateway.publish("citynode/down/" + NODE_B, b"lamp")       # the gateway's relay
        gateway.publish("citynode/down/" + NODE_A, b"own")
        time.sleep(0.5)
    finally:
        for c in (node, gateway, victim):
            c.close()
    assert victim.got == [("citynode/down/" + NODE_B, b"lamp")]
    assert set(node.got) == {("citynode/down/" + NODE_A, b"own")}


def test_no_node_takes_over_the_gateways_session_or_kicks_another_node(pole):
    # The gateway's persistent session holds what arrived while it was away. A node that
    # connects with the gateway's client id (or another node's) gets its own user name as
    # its client id instead: the queue stays the gateway's, the other node stays online.
    gateway_id = "citynode-gateway-pole-0042"
    gateway = Client(pole.port, *login(pole, pb.GATEWAY_USER), client_id=gateway_id, clean=False)
    gateway.subscribe("citynode/up/+")
    gateway.close()
    other = Client(pole.node_port, *login(pole, NODE_B), client_id=NODE_B)
    node = Client(pole.node_port, *login(pole, NODE_A))
    node.publish("citynode/up/" + NODE_A, b"queued for the gateway")
    node.close()
    thief = Client(pole.node_port, *login(pole, NODE_A), client_id=gateway_id, clean=False)
    thief.subscribe("citynode/up/+")
    kicker = Client(pole.node_port, *login(pole, NODE_A), client_id=NODE_B)
    time.sleep(0.5)
    kicked = other.dropped.is_set()
    for c in (thief, kicker, other):
        c.close()
    got: list[tuple[str, bytes]] = []
    back = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=gateway_id, clean_session=False)
    back.username_pw_set(*login(pole, pb.GATEWAY_USER))
    back.on_message = lambda c, u, m: got.append((m.topic, m.payload))
    back.connect("127.0.0.1", pole.port)
    back.loop_start()
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    back.disconnect()
    back.loop_stop()
    assert not kicked
    assert got == [("citynode/up/" + NODE_A, b"queued for the gateway")]


def test_an_oversized_packet_ends_its_senders_connection(pole):
    watch = gateway_watch(pole)
    node = Client(pole.node_port, *login(pole, NODE_A))
    try:
        node.c.publish("citynode/up/" + NODE_A, b"x" * 9000, qos=1)
        assert node.dropped.wait(5)
    finally:
        node.close()
        watch.close()
    assert watch.messages == []


def test_a_revoked_node_is_refused_after_the_reload(pole):
    Client(pole.node_port, *login(pole, NODE_A)).close()
    pole.set_accounts(pb.password_file_text(
        (user, pb.hash_secret(s)) for user, s in SECRETS.items() if user != NODE_A))
    time.sleep(0.3)
    with pytest.raises(Refused, match="Not authorized"):
        Client(pole.node_port, *login(pole, NODE_A))
    Client(pole.node_port, *login(pole, NODE_B)).close()


def test_the_shipped_listeners_are_loopback_and_the_access_point_only():
    text = (DEPLOY / "mosquitto.conf").read_text()
    listeners = re.findall(r"^listener\s+(\d+)(?:\s+(\S+))?\s*$", text, re.M)
    assert [addr for _, addr in listeners] == ["127.0.0.1", "10.42.0.1"]
    assert re.search(r"^allow_anonymous false$", text, re.M)
    assert re.search(r"^use_username_as_clientid true$", text, re.M)
    for line in ("password_file", "acl_file", "max_packet_size", "max_queued_messages",
                 "max_queued_bytes", "persistent_client_expiration"):
        assert re.search(rf"^{line} \S+", text, re.M), line
    # every listener has its connection cap right after it
    assert len(re.findall(r"^listener .*\nmax_connections \d+$", text, re.M)) == 2


def test_hashes_are_mosquitto_passwd_compatible(tmp_path):
    # the laptop hashes without mosquitto_passwd; the broker itself checks them above
    hashed = pb.hash_secret("s3cret")
    assert pb.secret_matches("s3cret", hashed) and not pb.secret_matches("s3creT", hashed)
    assert hashed != pb.hash_secret("s3cret")                      # salted
    with pytest.raises(pb.AccountError):
        pb.password_file_text([("bad user", hashed)])


def test_broker_accounts_come_from_the_registry(tmp_path):
    # `citynode-gateway broker-accounts` as the unit runs it: the gateway's account from
    # its secret, one per active node; a revoked node and one never given a password have
    # none. The real broker then lets in exactly those.
    registry = tmp_path / "registry"
    node, revoked, legacy = (TestDevice.random() for _ in range(3))
    node_secret, revoked_secret = pb.new_secret(), pb.new_secret()
    write_record(registry, replace(node.record(), broker_hash=pb.hash_secret(node_secret)))
    write_record(registry, replace(revoked.record("revoked"),
                                   broker_hash=pb.hash_secret(revoked_secret)))
    legacy.register(registry)
    config = tmp_path / "gateway.toml"
    secret_path = tmp_path / "etc" / "pole-broker.secret"
    config.write_text(f"""[gateway]
id = "pole-1"
state_dir = "{tmp_path / 'state'}"
registry_dir = "{registry}"
[local]
username = "{pb.GATEWAY_USER}"
password_file = "{secret_path}"
[upstream]
host = "127.0.0.1"
topic_prefix = "city"
""")
    broker = PoleBroker(tmp_path / "pole")
    cmd = [str(BIN / "citynode-gateway"), "broker-accounts", "--config", str(config),
           "--out", str(broker.passwd), "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 2 and "--new-gateway-secret" in first.stderr + first.stdout
    done = subprocess.run(cmd + ["--new-gateway-secret"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["result"]
    assert result["users"] == [pb.GATEWAY_USER, node.device_id]
    assert result["without_account"] == 2
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(broker.passwd.stat().st_mode) == 0o640
    gateway_secret = secret_path.read_text().strip()
    assert gateway_secret not in done.stdout + done.stderr
    assert gateway_secret not in broker.passwd.read_text()
    with broker:
        Client(broker.port, pb.GATEWAY_USER, gateway_secret).close()
        Client(broker.node_port, node.device_id, node_secret).close()
        with pytest.raises(Refused):
            Client(broker.node_port, revoked.device_id, revoked_secret)


def test_a_secret_handed_over_by_systemd_wins(tmp_path, monkeypatch):
    # LoadCredential=pole-broker.secret:/etc/citynode/pole-broker.secret: the service's user
    # cannot read the 0600 original, systemd copies it under $CREDENTIALS_DIRECTORY.
    configured = tmp_path / "etc" / "pole-broker.secret"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert credential(configured) == configured
    passed = tmp_path / "run" / "credentials"
    passed.mkdir(parents=True)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(passed))
    assert credential(configured) == configured          # not handed over: the file itself
    (passed / "pole-broker.secret").write_text("s\n")
    assert credential(configured) == passed / "pole-broker.secret"


def test_a_power_cut_on_the_pole_loses_nothing_the_node_was_told_was_delivered(
        tmp_path, upstream_broker):
    # SIGKILL of the gateway and then of the broker, as a power cut: what the broker had
    # acknowledged to the node (PUBACK) while the gateway was down must reach the city.
    # Mosquitto writes its queue to disk only when it saves: every 60 s it lost all of
    # it; deploy/ now saves after every change (autosave_on_changes). What no setting
    # closes: a cut between a PUBACK and that save (a fraction of a millisecond).
    device = TestDevice.random()
    pole = PoleBroker(tmp_path / "pole")
    gateway_secret = tmp_path / "gateway.secret"
    pb.write_secret(gateway_secret, SECRETS[pb.GATEWAY_USER])
    pole.passwd.write_text(pb.password_file_text(
        [(pb.GATEWAY_USER, pb.hash_secret(SECRETS[pb.GATEWAY_USER])),
         (device.device_id, pb.hash_secret(SECRETS[NODE_A]))]))
    gw = GatewayProcess(tmp_path / "gw", pole, upstream_broker, [device], local_extra={
        "username": pb.GATEWAY_USER, "password_file": str(gateway_secret)})
    collector = Collector(upstream_broker)
    acked: set[tuple[str, int]] = set()
    sent: dict[int, tuple[str, int]] = {}
    node = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device.device_id,
                       clean_session=False)
    node.username_pw_set(device.device_id, SECRETS[NODE_A])
    node.on_publish = lambda c, u, mid, rc, p: acked.add(sent[mid])
    node.reconnect_delay_set(0.05, 0.2)
    rounds = random.Random(12)
    pole.start()
    gw.start()
    node.connect("127.0.0.1", pole.node_port)
    node.loop_start()
    try:
        for _ in range(3):
            for _ in range(rounds.randint(10, 30)):
                data = device.envelope()
                sent[node.publish(wire.up_topic(device.device_id), data, qos=1).mid] = \
                    seq_of(data)
                time.sleep(0.02)
            gw.kill()
            for _ in range(rounds.randint(10, 30)):          # queued for the gateway
                data = device.envelope()
                sent[node.publish(wire.up_topic(device.device_id), data, qos=1).mid] = \
                    seq_of(data)
                time.sleep(0.02)
            time.sleep(0.2)
            pole.kill()
            pole.start()
            gw.start()
        gw.wait_for(lambda: acked <= set(collector.keys()), timeout=30,
                    what="every acknowledged envelope upstream")
    finally:
        node.loop_stop()
        gw.kill()
        pole.stop()
        collector.close()
    assert len(acked) >= 60

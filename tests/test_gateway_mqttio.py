"""gateway/mqttio.py: buffered reads and coalesced writes under paho, on real sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections import deque

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from citynode.gateway.mqttio import BufferedClient, BufferedSocket


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_reads_come_from_one_recv_and_pending_says_so(pair):
    a, b = pair
    b.sendall(b"\x30\x05hello\x40\x02\x00\x01")
    sock = BufferedSocket(a)
    assert sock.recv(1) == b"\x30"
    assert sock.pending() == 10  # the rest is in memory: paho must not wait in select
    assert sock.recv(1) == b"\x05"
    assert sock.recv(5) == b"hello"
    assert sock.recv(100) == b"\x40\x02\x00\x01"  # never more than the buffer holds
    assert sock.pending() == 0
    with pytest.raises(BlockingIOError):
        sock.recv(1)
    b.close()
    assert sock.recv(1) == b""  # EOF passes through


def test_writes_wait_for_flush_and_close_flushes(pair):
    a, b = pair
    sock = BufferedSocket(a)
    assert sock.send(b"abc") == 3 and sock.send(bytearray(b"def")) == 3
    assert sock.unsent() == 6
    b.settimeout(0.2)
    with pytest.raises(TimeoutError):
        b.recv(10)
    sock.flush()
    assert sock.unsent() == 0 and b.recv(10) == b"abcdef"
    sock.send(b"bye")
    sock.close()
    assert b.recv(10) == b"bye"


def test_a_full_kernel_buffer_keeps_the_rest(pair):
    a, b = pair
    sock = BufferedSocket(a)
    sock.send(b"x" * (8 << 20))  # more than a socket pair's buffers take
    sock.flush()
    left = sock.unsent()
    assert 0 < left < 8 << 20
    got = 0
    b.settimeout(2)
    while got < (8 << 20):
        got += len(b.recv(1 << 20))
        sock.flush()
    assert sock.unsent() == 0 and got == 8 << 20


def test_paho_round_trip_through_a_broker(local_broker):
    """QoS 1 both ways through Mosquitto: every message arrives once, in order, and
    manual acks written from another thread go out (the broker sends the next ones)."""
    got: list[bytes] = []
    acks: deque[int] = deque()
    done = threading.Event()
    n = 300

    sub = BufferedClient(CallbackAPIVersion.VERSION2, client_id="mqttio-sub",
                         protocol=mqtt.MQTTv311, clean_session=False, manual_ack=True)

    def on_message(client, userdata, message):
        got.append(message.payload)
        acks.append(message.mid)
        if len(got) == n:
            done.set()

    sub.on_message = on_message
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe("mqttio/#", qos=1)
    sub.connect(local_broker.host, local_broker.port)
    sub.loop_start()

    def acker():  # like the ingest's writer thread: acks in batches from outside paho
        while not done.is_set() or acks:
            while acks:
                sub.ack(acks.popleft(), 1)
            time.sleep(0.005)

    thread = threading.Thread(target=acker, daemon=True)
    thread.start()
    time.sleep(0.3)

    pub = BufferedClient(CallbackAPIVersion.VERSION2, client_id="mqttio-pub",
                         protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(32)
    pub.connect(local_broker.host, local_broker.port)
    infos = []
    deadline = time.monotonic() + 20
    with pub.corked():
        for i in range(n):
            infos.append(pub.publish(f"mqttio/{i % 7}", str(i).encode(), qos=1))
    while not all(info.is_published() for info in infos) and time.monotonic() < deadline:
        assert pub.poll(0.05) == mqtt.MQTT_ERR_SUCCESS
    assert done.wait(max(0.1, deadline - time.monotonic())), f"{len(got)} of {n} arrived"
    thread.join(5)
    assert got == [str(i).encode() for i in range(n)]
    pub.disconnect()
    assert pub.poll(0.05) != mqtt.MQTT_ERR_SUCCESS or pub.socket() is None
    sub.disconnect()
    sub.loop_stop()


def self_signed(directory) -> tuple[str, str]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_round_trip(tmp_path):
    """The city's broker is reached over TLS: buffered reads (TLS `pending()` too),
    corked and polled writes, through a real TLS listener."""
    from citynode.mosquitto import Mosquitto, free_port

    cert, key = self_signed(tmp_path)
    port = free_port()
    extra = f"listener {port} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\n"
    with Mosquitto(tmp_path / "broker", extra_config=extra):
        got: list[bytes] = []
        sub = BufferedClient(CallbackAPIVersion.VERSION2, client_id="tls-sub",
                             protocol=mqtt.MQTTv5)
        sub.tls_set(ca_certs=cert)
        sub.on_connect = lambda c, u, f, rc, p: c.subscribe("tls/#", qos=1)
        sub.on_message = lambda c, u, m: got.append(m.payload)
        sub.connect("127.0.0.1", port)
        sub.loop_start()
        time.sleep(0.5)
        pub = BufferedClient(CallbackAPIVersion.VERSION2, client_id="tls-pub",
                             protocol=mqtt.MQTTv5)
        pub.tls_set(ca_certs=cert)
        pub.max_inflight_messages_set(32)
        pub.connect("127.0.0.1", port)
        n = 2000
        sent = [b"%d-" % i + b"x" * 300 for i in range(n)]
        with pub.corked():
            infos = [pub.publish(f"tls/{i % 5}", data, qos=1) for i, data in enumerate(sent)]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (
                len(got) < n or not all(info.is_published() for info in infos)):
            assert pub.poll(0.05) == mqtt.MQTT_ERR_SUCCESS
        assert got == sent
        pub.disconnect()
        sub.disconnect()
        sub.loop_stop()

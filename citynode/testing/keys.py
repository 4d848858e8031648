"""Test keys and envelopes: devices whose envelopes the tests sign with citynode.wire."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from citynode import wire
from citynode.registry import DeviceRecord, write_record


@dataclass
class TestDevice:
    """A device with a fresh P-256 key (or an HMAC secret) and its own sequence counter."""

    __test__ = False

    device_id: str
    alg: str = "ES256"
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(
        ec.SECP256R1()))
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    seq: int = 0

    @classmethod
    def random(cls, alg: str = "ES256") -> TestDevice:
        return cls(f"cn-{secrets.token_hex(6)}", alg)

    def record(self, status: str = "active") -> DeviceRecord:
        pem = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        return DeviceRecord(
            device_id=self.device_id, alg=self.alg, board="esp32-devkitc", site="test",
            pole="pole-1", lat=48.2, lon=16.37, firmware="0.1.0", status=status,
            provisioned_at="2026-11-23T12:00:00Z",
            public_key_pem=pem if self.alg == "ES256" else None,
            key_ref=f"keys/{self.device_id}.hex" if self.alg == "HMAC256" else None)

    def register(self, registry_dir: Path, status: str = "active") -> None:
        if self.alg == "HMAC256":
            (registry_dir / "keys").mkdir(parents=True, exist_ok=True)
            (registry_dir / "keys" / f"{self.device_id}.hex").write_text(self.secret.hex())
        write_record(registry_dir, self.record(status))

    def payload(self, seq: int, kind: int = wire.KIND_READINGS, node_time: float | None = None,
                device: str | None = None) -> bytes:
        """A version-2 payload; `node_time` in Unix seconds (default now)."""
        unix_ms = int(1000 * (time.time() if node_time is None else node_time))
        body = {wire.K_VERSION: wire.WIRE_VERSION, wire.K_DEVICE: device or self.device_id,
                wire.K_SEQ: seq, wire.K_BOOT: 1, wire.K_UPTIME: seq * 1000, wire.K_KIND: kind,
                wire.K_TIME: unix_ms,
                wire.K_RECORDS: [{-2: "light/", 0: "lux", 1: "lx", 2: 120.5 + seq}]}
        return cbor2.dumps(body)

    def envelope(self, seq: int | None = None, **kwargs) -> bytes:
        if seq is None:
            self.seq += 1
            seq = self.seq
        payload = self.payload(seq, **kwargs)
        if self.alg == "HMAC256":
            return wire.mac_hmac(payload, self.device_id, self.secret)
        return wire.sign_es256(payload, self.device_id, self.key)


def seq_of(envelope: bytes) -> tuple[str, int]:
    """(device, seq) of an envelope, without verifying it."""
    env = wire.decode_envelope(envelope)
    body = cbor2.loads(env.payload)
    return body[wire.K_DEVICE], body[wire.K_SEQ]

"""Regenerate tests/vectors/wire.json from the HOST implementation.

    .venv/bin/python -m tests.vectors.make_wire_vectors

Expected bytes come from cbor2, citynode/wire.py and cryptography (deterministic
ECDSA, RFC 6979), never from the firmware, so the firmware tests compare two
independent implementations. The payload rules written out here (float32 for
non-integral numbers, field order) are those of docs/wire-format.md and
firmware/node/payload.py; change all three together.
"""

from __future__ import annotations

import hmac
import json
import math
import struct
from pathlib import Path

import cbor2
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from citynode import wire

OUT = Path(__file__).with_name("wire.json")

# Test keys only: fixed so the vectors are reproducible. Never use them on a pole.
NODE_PRIVATE = 0x2F6B3A1C8E5D4F7091A2B3C4D5E6F708192A3B4C5D6E7F8091A2B3C4D5E6F701
OPERATOR_PRIVATE = 0x6A1D0E9F8C7B6A5948372615F4E3D2C1B0A99887766554433221100FFEEDDCC1
HMAC_SECRET = bytes(range(0x40, 0x60))
DEVICE = "cn-240ac4e29526"

LABELS = {"bn": -2, "bt": -3, "bu": -4, "n": 0, "u": 1, "v": 2, "vs": 3, "vb": 4, "s": 5, "t": 6}

PAYLOADS = [
    {
        "name": "window readings, clock synced",
        "input": {
            "device": DEVICE, "seq": 4711, "boot": 3, "uptime_ms": 3_600_125, "kind": 0,
            "time_ms": 1_763_900_000_125,
            "records": [
                ["light/lux", "lx", 412.5],
                ["noise/laeq", "dBA", 61.3],
                ["noise/lamax", "dBA", 78.25],
                ["air/pm2_5", "ug/m3", 12.0],
                ["air/temp", "Cel", -3.75],
                ["air/rh", "%RH", 81.1],
                ["air/pressure", "Pa", 101325],
            ],
        },
    },
    {
        "name": "impulse event before clock sync, large seq, 58 days up",
        "input": {
            "device": DEVICE, "seq": 4_294_967_301, "boot": 70_000, "uptime_ms": 5_000_012_345,
            "kind": 1,
            "records": [["noise/impulse", "dBA", 104.5, -0.125]],
        },
    },
    {
        "name": "status with base name and dict records",
        "input": {
            "device": DEVICE, "seq": 0, "boot": 1, "uptime_ms": 0, "kind": 2,
            "time_ms": 1_763_900_060_500,
            "records": [
                {"bn": "status/", "n": "wifi", "u": "dBm", "v": -67},
                {"n": "pms5003", "vs": "missing"},
                {"n": "lamp", "vb": True},
                {"n": "heap", "u": "B", "v": 48213, "t": -1.5},
            ],
        },
    },
]

COMMAND = {"device": DEVICE, "seq": 7, "command": "set_interval", "args": {"seconds": 60},
           "time": 1_763_900_100}


class F32:
    """A float that the node writes as CBOR float32 (0xfa)."""

    def __init__(self, x: float):
        self.x = x


def _default(encoder, value):
    if isinstance(value, F32):
        encoder.write(b"\xfa" + struct.pack(">f", value.x))
    else:
        raise TypeError(f"cannot encode {type(value).__name__}")


def _number(x):
    if isinstance(x, float):
        if math.isfinite(x) and x == int(x):
            return int(x)
        return F32(x)
    return x


def _value_label(v) -> int:
    if isinstance(v, bool):
        return LABELS["vb"]
    if isinstance(v, str):
        return LABELS["vs"]
    return LABELS["v"]


def _record(rec) -> dict:
    if isinstance(rec, dict):
        labelled = []
        for key, value in rec.items():
            label = LABELS[key]
            if label == LABELS["v"]:
                label = _value_label(value)
            labelled.append((cbor2.dumps(label), label, _number(value)))
        return {label: value for _, label, value in sorted(labelled, key=lambda p: p[0])}
    name, unit, value, *rest = rec
    out = {LABELS["n"]: name, LABELS["u"]: unit, _value_label(value): _number(value)}
    if rest:
        out[LABELS["t"]] = _number(rest[0])
    return out


def payload_bytes(inp: dict) -> bytes:
    body = {wire.K_VERSION: wire.WIRE_VERSION, wire.K_DEVICE: inp["device"],
            wire.K_SEQ: inp["seq"], wire.K_BOOT: inp["boot"]}
    if inp.get("time_ms") is not None:
        body[wire.K_TIME] = inp["time_ms"]
    body[wire.K_UPTIME] = inp["uptime_ms"]
    body[wire.K_KIND] = inp["kind"]
    body[wire.K_RECORDS] = [_record(r) for r in inp["records"]]
    return cbor2.dumps(body, default=_default)


def _pub_hex(key: ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint).hex()


def _sign1_with_protected(protected: bytes, payload: bytes, kid: str, key) -> bytes:
    """A COSE_Sign1 with any protected header, validly signed (for the wrong-alg and
    non-canonical vectors)."""
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    tbs = cbor2.dumps(["Signature1", protected, b"", payload])
    r, s = decode_dss_signature(key.sign(tbs, ec.ECDSA(hashes.SHA256(),
                                                       deterministic_signing=True)))
    body = [protected, {wire.HDR_KID: kid.encode()}, payload,
            r.to_bytes(32, "big") + wire.low_s(s).to_bytes(32, "big")]
    return cbor2.dumps(cbor2.CBORTag(wire.TAG_SIGN1, body))


def _mac0_with_protected(protected: bytes, payload: bytes, kid: str, secret: bytes) -> bytes:
    """A COSE_Mac0 with any protected header, validly tagged."""
    tag = hmac.new(secret, cbor2.dumps(["MAC0", protected, b"", payload]), "sha256").digest()
    body = [protected, {wire.HDR_KID: kid.encode()}, payload, tag]
    return cbor2.dumps(cbor2.CBORTag(wire.TAG_MAC0, body))


def high_s_twin(envelope: bytes) -> bytes:
    """The envelope with s replaced by n - s: still a valid ECDSA signature, made
    without the key (what the low-S rule refuses)."""
    item = cbor2.loads(envelope)
    protected, unprotected, payload, sig = item.value
    twin = sig[:32] + (wire.P256_N - int.from_bytes(sig[32:], "big")).to_bytes(32, "big")
    return cbor2.dumps(cbor2.CBORTag(item.tag, [protected, unprotected, payload, twin]))


def padded(envelope: bytes) -> bytes:
    """The envelope with padding under a private label beside the kid: the unprotected
    header is not signed, so the signature still verifies."""
    item = cbor2.loads(envelope)
    protected, unprotected, payload, sig = item.value
    extra = {**unprotected, -65537: bytes(16)}
    return cbor2.dumps(cbor2.CBORTag(item.tag, [protected, extra, payload, sig]))


def long_payload_head(envelope: bytes) -> bytes:
    """The envelope with its payload's length in 4 bytes where 1 or 2 do: the same
    content (the same valid signature) in other bytes."""
    payload = cbor2.loads(envelope).value[2]
    longer = b"\x5a" + len(payload).to_bytes(4, "big") + payload
    return envelope.replace(cbor2.dumps(payload), longer, 1)


# {1: -7} and {1: 5} with the alg in a one-byte argument: CBOR, but not the shortest form
LONG_ES256 = b"\xa1\x01\x38\x06"
LONG_HMAC256 = b"\xa1\x01\x18\x05"


def _noncanonical_uplinks(raw: bytes, sign1: bytes, node) -> list[dict]:
    """Genuinely signed envelopes that are not in the one canonical form: malformed."""
    cases = [
        ("high-s twin", "node", high_s_twin(sign1)),
        ("protected es256 not shortest", "node", _sign1_with_protected(LONG_ES256, raw, DEVICE,
                                                                       node)),
        ("protected hmac256 not shortest", "hmac",
         _mac0_with_protected(LONG_HMAC256, raw, DEVICE, HMAC_SECRET)),
        ("unprotected padded", "node", padded(sign1)),
        ("payload length not shortest", "node", long_payload_head(sign1)),
    ]
    return [{"name": name, "signer": signer, "envelope": env.hex(), "reason": "malformed"}
            for name, signer, env in cases]


def build() -> dict:
    node = ec.derive_private_key(NODE_PRIVATE, ec.SECP256R1())
    operator = ec.derive_private_key(OPERATOR_PRIVATE, ec.SECP256R1())
    payloads = []
    for vec in PAYLOADS:
        raw = payload_bytes(vec["input"])
        payloads.append({
            **vec,
            "payload": raw.hex(),
            "sign1": wire.sign_es256(raw, DEVICE, node).hex(),
            "mac0": wire.mac_hmac(raw, DEVICE, HMAC_SECRET).hex(),
        })
    cmd = wire.encode_command(COMMAND["device"], COMMAND["seq"], COMMAND["command"],
                              COMMAND["args"], COMMAND["time"])
    cmd_sign1 = wire.sign_es256(cmd, wire.OPERATOR_KID, operator)
    first = bytes.fromhex(payloads[0]["payload"])
    return {
        "about": "citynode wire-format vectors (docs/wire-format.md); regenerate with "
                 "tests/vectors/make_wire_vectors.py. TEST KEYS ONLY.",
        "node": {
            "device": DEVICE,
            "private_key": f"{NODE_PRIVATE:064x}",
            "public_key": _pub_hex(node),
            "hmac_secret": HMAC_SECRET.hex(),
        },
        "reasons": list(wire.REASONS),
        "payloads": payloads,
        "noncanonical": _noncanonical_uplinks(first, bytes.fromhex(payloads[0]["sign1"]), node),
        "command": {
            "input": COMMAND,
            "operator_private_key": f"{OPERATOR_PRIVATE:064x}",
            "operator_public_key": _pub_hex(operator),
            "payload": cmd.hex(),
            "sign1": cmd_sign1.hex(),
            "wrong_alg_sign1": _sign1_with_protected(cbor2.dumps({wire.HDR_ALG: -35}), cmd,
                                                     wire.OPERATOR_KID, operator).hex(),
            # genuinely signed by the operator, not canonical: refused as malformed
            "high_s_sign1": high_s_twin(cmd_sign1).hex(),
            "long_alg_sign1": _sign1_with_protected(LONG_ES256, cmd, wire.OPERATOR_KID,
                                                    operator).hex(),
            "padded_sign1": padded(cmd_sign1).hex(),
            "long_head_sign1": long_payload_head(cmd_sign1).hex(),
            "long_kid_sign1": wire.sign_es256(cmd, "operator.example", operator).hex(),
        },
    }


def main() -> None:
    OUT.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

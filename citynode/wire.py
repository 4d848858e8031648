"""The uplink and downlink wire format on the host side (docs/wire-format.md).

The firmware has its own MicroPython encoder; both are held byte-compatible by
tests/vectors/wire.json. Decoding never trusts the input: every failure is an
EnvelopeError with a reason the gateway counts by.
"""

from __future__ import annotations

import hashlib
import hmac
import io
from dataclasses import dataclass, field
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

MAX_ENVELOPE_BYTES = 4096
TAG_SIGN1 = 18
TAG_MAC0 = 17
ALG_ES256 = -7
ALG_HMAC256 = 5
HDR_ALG = 1
HDR_KID = 4

KIND_READINGS, KIND_EVENT, KIND_STATUS, KIND_SELFTEST = 0, 1, 2, 3
K_DEVICE, K_SEQ, K_BOOT, K_TIME, K_UPTIME, K_KIND, K_RECORDS = 1, 2, 3, 4, 5, 6, 7
K_COMMAND, K_ARGS = 10, 11
OPERATOR_KID = "operator"


class EnvelopeError(ValueError):
    """An envelope that must be rejected; `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Envelope:
    alg: int
    kid: str
    protected: bytes
    payload: bytes
    signature: bytes

    @property
    def is_hmac(self) -> bool:
        return self.alg == ALG_HMAC256

    def to_be_signed(self) -> bytes:
        """Sig_structure / MAC_structure [context, protected, h'', payload], written
        directly (it is built for every envelope the gateway verifies)."""
        context = _MAC0_HEAD if self.is_hmac else _SIGN1_HEAD
        return context + _bstr_head(len(self.protected)) + self.protected + b"\x40" + \
            _bstr_head(len(self.payload)) + self.payload


_SIGN1_HEAD = b"\x84\x6aSignature1"  # array(4), text(10)
_MAC0_HEAD = b"\x84\x64MAC0"  # array(4), text(4)
_ES256 = ec.ECDSA(hashes.SHA256())


def _bstr_head(n: int) -> bytes:
    """The CBOR head of a byte string of length n (major type 2, shortest form)."""
    if n < 24:
        return bytes([0x40 | n])
    if n < 0x100:
        return bytes([0x58, n])
    if n < 0x10000:
        return b"\x59" + n.to_bytes(2, "big")
    return b"\x5a" + n.to_bytes(4, "big")


@dataclass(frozen=True)
class Payload:
    device: str
    seq: int
    boot: int
    uptime_ms: int
    kind: int
    records: list[dict[int, Any]] = field(default_factory=list)
    time: int | None = None


def _loads_exact(data: bytes) -> Any:
    """cbor2.loads, but trailing bytes after the item are an error (cbor2 ignores them)."""
    stream = io.BytesIO(data)
    item = cbor2.CBORDecoder(stream).decode()
    if stream.tell() != len(data):
        raise ValueError(f"{len(data) - stream.tell()} trailing bytes")
    return item


def decode_envelope(data: bytes, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
    """Parse a COSE_Sign1 / COSE_Mac0 envelope without verifying it."""
    if len(data) > max_bytes:
        raise EnvelopeError("oversized", f"{len(data)} bytes > {max_bytes}")
    try:
        item = _loads_exact(data)
    except Exception as exc:  # cbor2 raises many types on garbage
        raise EnvelopeError("malformed", f"not CBOR ({exc.__class__.__name__})") from None
    if not isinstance(item, cbor2.CBORTag) or item.tag not in (TAG_SIGN1, TAG_MAC0):
        raise EnvelopeError("malformed", "not a COSE_Sign1 or COSE_Mac0 tag")
    body = item.value
    if not (isinstance(body, list) and len(body) == 4):
        raise EnvelopeError("malformed", "COSE structure must be an array of 4")
    protected, unprotected, payload, signature = body
    if not all(isinstance(x, bytes) for x in (protected, payload, signature)):
        raise EnvelopeError("malformed", "protected, payload and signature must be byte strings")
    if not isinstance(unprotected, dict):
        raise EnvelopeError("malformed", "unprotected header must be a map")
    try:
        headers = _loads_exact(protected) if protected else {}
    except Exception:
        raise EnvelopeError("malformed", "protected header is not CBOR") from None
    alg = headers.get(HDR_ALG) if isinstance(headers, dict) else None
    expected = ALG_ES256 if item.tag == TAG_SIGN1 else ALG_HMAC256
    if alg != expected:
        raise EnvelopeError("malformed", f"alg {alg!r} does not fit tag {item.tag}")
    kid = unprotected.get(HDR_KID)
    if not isinstance(kid, bytes) or not kid:
        raise EnvelopeError("malformed", "missing kid")
    try:
        kid_text = kid.decode()
    except UnicodeDecodeError:
        raise EnvelopeError("malformed", "kid is not UTF-8") from None
    size = 64 if alg == ALG_ES256 else 32
    if len(signature) != size:
        raise EnvelopeError("malformed", f"signature must be {size} bytes")
    return Envelope(alg, kid_text, protected, payload, signature)


def verify_es256(envelope: Envelope, public_key: ec.EllipticCurvePublicKey) -> None:
    r = int.from_bytes(envelope.signature[:32], "big")
    s = int.from_bytes(envelope.signature[32:], "big")
    try:
        public_key.verify(encode_dss_signature(r, s), envelope.to_be_signed(), _ES256)
    except InvalidSignature:
        raise EnvelopeError("bad_signature", f"ES256 signature of {envelope.kid} fails") from None


def verify_hmac(envelope: Envelope, secret: bytes) -> None:
    tag = hmac.new(secret, envelope.to_be_signed(), hashlib.sha256).digest()
    if not hmac.compare_digest(tag, envelope.signature):
        raise EnvelopeError("bad_signature", f"HMAC tag of {envelope.kid} fails")


def decode_payload(envelope: Envelope) -> Payload:
    try:
        body = _loads_exact(envelope.payload)
    except Exception:
        raise EnvelopeError("malformed", "payload is not CBOR") from None
    if not isinstance(body, dict):
        raise EnvelopeError("malformed", "payload must be a map")
    device, seq = body.get(K_DEVICE), body.get(K_SEQ)
    if not isinstance(device, str) or device != envelope.kid:
        raise EnvelopeError("malformed", "payload device does not match the kid")
    if not _is_uint(seq):
        raise EnvelopeError("malformed", "missing or negative sequence number")
    records = body.get(K_RECORDS, [])
    if not isinstance(records, list):
        raise EnvelopeError("malformed", "records must be an array")
    time = body.get(K_TIME)
    if time is not None and not _is_uint(time):
        raise EnvelopeError("malformed", f"payload key {K_TIME} (time) must be an unsigned integer")
    return Payload(
        device=device, seq=seq, boot=_uint(body, K_BOOT), uptime_ms=_uint(body, K_UPTIME),
        kind=_uint(body, K_KIND), records=records, time=time)


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _uint(body: dict, key: int) -> int:
    """A required unsigned key (boot, uptime, kind are always present per the doc)."""
    value = body.get(key)
    if not _is_uint(value):
        raise EnvelopeError("malformed", f"payload key {key} must be an unsigned integer")
    return value


# --- signing: for the operator's downlink commands and for tests ---------------

def sign_es256(payload: bytes, kid: str, private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """COSE_Sign1 with a deterministic nonce (RFC 6979), as the wire format requires."""
    protected = cbor2.dumps({HDR_ALG: ALG_ES256})
    tbs = cbor2.dumps(["Signature1", protected, b"", payload])
    r, s = decode_dss_signature(private_key.sign(
        tbs, ec.ECDSA(hashes.SHA256(), deterministic_signing=True)))
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    body = [protected, {HDR_KID: kid.encode()}, payload, signature]
    return cbor2.dumps(cbor2.CBORTag(TAG_SIGN1, body))


def mac_hmac(payload: bytes, kid: str, secret: bytes) -> bytes:
    protected = cbor2.dumps({HDR_ALG: ALG_HMAC256})
    tag = hmac.new(secret, cbor2.dumps(["MAC0", protected, b"", payload]), hashlib.sha256).digest()
    return cbor2.dumps(cbor2.CBORTag(TAG_MAC0, [protected, {HDR_KID: kid.encode()}, payload, tag]))


def encode_command(device: str, seq: int, command: str, args: dict, time: int) -> bytes:
    return cbor2.dumps({K_DEVICE: device, K_SEQ: seq, K_TIME: time, K_COMMAND: command,
                        K_ARGS: args})

"""The uplink and downlink wire format on the host side (docs/wire-format.md).

The firmware has its own MicroPython encoder; both are held byte-compatible by
tests/vectors/wire.json. Decoding never trusts the input: every failure is an
EnvelopeError with a reason the gateway counts by.
"""

from __future__ import annotations

import hashlib
import hmac
import io
from collections.abc import Callable, Mapping
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
MAX_SEQ = 2**53 - 1     # a sequence number above is refused: exact as a double, an SQLite
                        # INTEGER, and ~285,000 years of one envelope a second
MAX_UINT = 2**64 - 1    # CBOR's largest plain unsigned integer (a bignum is refused)
TAG_SIGN1 = 18
TAG_MAC0 = 17
ALG_ES256 = -7
ALG_HMAC256 = 5
HDR_ALG = 1
HDR_KID = 4
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # group order
HALF_N = P256_N // 2    # low-S: an ES256 signature's s is at most this
# The one encoding of each protected header (docs/wire-format.md, canonical envelopes)
PROTECTED = {ALG_ES256: b"\xa1\x01\x26",     # {1: -7}
             ALG_HMAC256: b"\xa1\x01\x05"}   # {1: 5}
MAX_KID_BYTES = len("cn-") + 12     # a device id; the operator's kid ("operator") is shorter

KIND_READINGS, KIND_EVENT, KIND_STATUS, KIND_SELFTEST = 0, 1, 2, 3
K_VERSION, K_DEVICE, K_SEQ, K_BOOT, K_TIME, K_UPTIME, K_KIND, K_RECORDS = 0, 1, 2, 3, 4, 5, 6, 7
# Payload versions: 1 (no key 0) time in Unix seconds, uptime wrapping at 2**30 ms;
# 2 time in Unix milliseconds, uptime in full.
WIRE_VERSION = 2
K_COMMAND, K_ARGS = 10, 11
K_EXPIRES = 12      # a command's own deadline (Unix s), shorter than the relays' MAX_AGE_S
OPERATOR_KID = "operator"

UP_PREFIX = "citynode/up/"      # node -> pole broker
DOWN_PREFIX = "citynode/down/"  # pole broker -> node

# Why an envelope or a command is refused: the words the gateway counts by and the
# node reports (firmware/node/commands.py), the same on both sides (tests/vectors).
REASONS = (
    "oversized",        # longer than the limit
    "malformed",        # not the structure of docs/wire-format.md
    "unknown_device",   # the kid is not in the registry
    "revoked",          # the registry marks the device revoked
    "key_unavailable",  # the device's key cannot be read
    "bad_signature",    # not signed by the expected signer with the expected algorithm
    "wrong_device",     # a command for another device than the one it was sent to
    "duplicate",        # this (device, seq) was already received
    "replayed",         # seq at or below what was already accepted
    "internal_error",   # a bug of ours; counted so that it shows
    "no_operator_key",  # the node has no operator key to check a command with
    "unknown_command",  # a command the node does not carry out
    "bad_args",         # a command's arguments do not fit it
    "expired",          # a command issued too long ago (or ahead) by the node's clock
)


def device_id(mac: str | bytes) -> str:
    """The device id of a node: cn- and its base MAC as 12 lowercase hex digits."""
    text = mac.hex() if isinstance(mac, bytes) else mac.replace(":", "").lower()
    return "cn-" + text


def up_topic(device: str) -> str:
    return UP_PREFIX + device


def down_topic(device: str) -> str:
    return DOWN_PREFIX + device


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
    time_ms: int | None = None      # Unix ms when the node's clock was synced
    version: int = WIRE_VERSION


def _loads_exact(data: bytes) -> Any:
    """cbor2.loads, but trailing bytes after the item are an error (cbor2 ignores them)."""
    stream = io.BytesIO(data)
    item = cbor2.CBORDecoder(stream).decode()
    if stream.tell() != len(data):
        raise ValueError(f"{len(data) - stream.tell()} trailing bytes")
    return item


def decode_envelope(data: bytes, max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
    """Parse a COSE_Sign1 / COSE_Mac0 envelope without verifying it; anything but its one
    canonical form (docs/wire-format.md) is malformed."""
    if len(data) > max_bytes:
        raise EnvelopeError("oversized", f"{len(data)} bytes > {max_bytes}")
    try:
        item = _loads_exact(data)
    except Exception as exc:  # cbor2 raises many types on garbage
        raise EnvelopeError("malformed", f"not CBOR ({exc.__class__.__name__})") from None
    if not isinstance(item, cbor2.CBORTag) or item.tag not in (TAG_SIGN1, TAG_MAC0):
        raise EnvelopeError("malformed", "not a COSE_Sign1 or COSE_Mac0 tag")
    body = item.value   # cbor2 >= 6 decodes a tag's array as a tuple, its maps as frozendict
    if not (isinstance(body, list | tuple) and len(body) == 4):
        raise EnvelopeError("malformed", "COSE structure must be an array of 4")
    protected, unprotected, payload, signature = body
    if not all(isinstance(x, bytes) for x in (protected, payload, signature)):
        raise EnvelopeError("malformed", "protected, payload and signature must be byte strings")
    if not isinstance(unprotected, Mapping):
        raise EnvelopeError("malformed", "unprotected header must be a map")
    alg = _alg(item.tag, protected)
    kid = _kid(unprotected)
    size = 64 if alg == ALG_ES256 else 32
    if len(signature) != size:
        raise EnvelopeError("malformed", f"signature must be {size} bytes")
    if alg == ALG_ES256:
        _check_low_s(signature)
    if cbor2.dumps(item) != data:
        raise EnvelopeError("malformed", "not in shortest form: a tag, length or label is "
                            "written longer than needed (or indefinite); encode every CBOR "
                            "head in its shortest form")
    return Envelope(alg, kid, protected, payload, signature)


def _show(value: Any, limit: int = 40) -> str:
    """A bounded repr of untrusted input, for an error message."""
    text = value.hex() if isinstance(value, bytes) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _alg(tag: int, protected: bytes) -> int:
    """The alg of a COSE tag, if `protected` is exactly its canonical header. Another
    spelling of {1: alg} (a longer integer, an indefinite map, a second key) is refused:
    one envelope content, one encoding."""
    alg = ALG_ES256 if tag == TAG_SIGN1 else ALG_HMAC256
    if protected == PROTECTED[alg]:
        return alg
    try:
        headers = _loads_exact(protected) if protected else {}
    except Exception:
        raise EnvelopeError("malformed", "protected header is not CBOR") from None
    found = headers.get(HDR_ALG) if isinstance(headers, dict) else None
    if found != alg:
        raise EnvelopeError("malformed", f"alg {_show(found)} does not fit tag {tag}")
    raise EnvelopeError("malformed", f"protected header {_show(protected)} is not the canonical "
                        f"{PROTECTED[alg].hex()} ({{1: {alg}}}): encode it shortest-form, "
                        "with no other key")


def _kid(unprotected: Mapping) -> str:
    """The kid, the unprotected header's one entry. That header is not signed: anything
    else in it would let anyone make another valid envelope of the same signature."""
    labels = list(unprotected)
    if not labels:
        raise EnvelopeError("malformed", "missing kid")
    if len(labels) > 1 or type(labels[0]) is not int or labels[0] != HDR_KID:
        raise EnvelopeError("malformed", f"the unprotected header holds {_show(labels)}: "
                            f"only the kid (label {HDR_KID}) belongs there")
    kid = unprotected[HDR_KID]
    if not isinstance(kid, bytes) or not kid:
        raise EnvelopeError("malformed", "the kid must be a non-empty byte string")
    if len(kid) > MAX_KID_BYTES:
        raise EnvelopeError("malformed", f"kid of {len(kid)} bytes: a kid is a device id "
                            f"(cn- and 12 hex digits) or {OPERATOR_KID!r}, at most "
                            f"{MAX_KID_BYTES} bytes")
    try:
        return kid.decode()
    except UnicodeDecodeError:
        raise EnvelopeError("malformed", "kid is not UTF-8") from None


def _check_low_s(signature: bytes) -> None:
    """ECDSA's (r, s) and (r, n - s) both verify: only the low s is taken, else anyone
    could turn one envelope into a second valid one."""
    if int.from_bytes(signature[32:], "big") > HALF_N:
        raise EnvelopeError("malformed", "ES256 signature with a high s (above n/2): the "
                            "signer must send n - s (low-S, docs/wire-format.md)")


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
    if not _is_uint(seq) or seq > MAX_SEQ:
        raise EnvelopeError("malformed", "the sequence number must be an integer from 0 to "
                            "2**53 - 1")
    records = body.get(K_RECORDS, [])
    if not isinstance(records, list):
        raise EnvelopeError("malformed", "records must be an array")
    version = body.get(K_VERSION, 1)
    if version not in (1, WIRE_VERSION):
        raise EnvelopeError("malformed", f"payload version {_show(version)}: this gateway "
                            f"reads versions 1 and {WIRE_VERSION} (upgrade it)")
    time = body.get(K_TIME)
    if time is not None and not _is_uint(time):
        raise EnvelopeError("malformed", f"payload key {K_TIME} (time) must be an unsigned integer")
    return Payload(
        device=device, seq=seq, boot=_uint(body, K_BOOT), uptime_ms=_uint(body, K_UPTIME),
        kind=_uint(body, K_KIND), records=records,
        time_ms=time * 1000 if time is not None and version == 1 else time, version=version)


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_UINT


def _uint(body: dict, key: int) -> int:
    """A required unsigned key (boot, uptime, kind are always present per the doc)."""
    value = body.get(key)
    if not _is_uint(value):
        raise EnvelopeError("malformed", f"payload key {key} must be an unsigned integer")
    return value


# --- opening: decode, find the signer's key, verify, decode the payload ----------

# The key that verifies signer `kid`'s envelopes made with "ES256" or "HMAC256": an EC
# public key or an HMAC secret (registry.Registry.key_for). EnvelopeError when there is
# none: unknown_device, revoked, key_unavailable, bad_signature (another algorithm).
KeyLookup = Callable[[str, str], "ec.EllipticCurvePublicKey | bytes"]


def verify(envelope: Envelope, key: ec.EllipticCurvePublicKey | bytes) -> None:
    if envelope.is_hmac:
        if not isinstance(key, bytes):
            raise EnvelopeError("bad_signature", f"{envelope.kid} has no HMAC secret")
        verify_hmac(envelope, key)
    else:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise EnvelopeError("bad_signature", f"{envelope.kid} has no ES256 public key")
        verify_es256(envelope, key)


def open_envelope(data: bytes, key_for: KeyLookup,
                  max_bytes: int = MAX_ENVELOPE_BYTES) -> Payload:
    """A node's envelope, verified with its signer's key; EnvelopeError says why not."""
    envelope = decode_envelope(data, max_bytes)
    verify(envelope, key_for(envelope.kid, "HMAC256" if envelope.is_hmac else "ES256"))
    return decode_payload(envelope)


@dataclass(frozen=True)
class Command:
    device: str
    seq: int
    time: int
    name: str
    args: dict
    expires: int | None = None


def open_command(data: bytes, operator_key: ec.EllipticCurvePublicKey,
                 device: str | None = None) -> Command:
    """An operator's downlink command, verified; `device` is the one it must be for."""
    envelope = decode_envelope(data)
    if envelope.is_hmac:
        raise EnvelopeError("malformed", "a command is a COSE_Sign1, not a COSE_Mac0")
    if envelope.kid != OPERATOR_KID:
        raise EnvelopeError("bad_signature", "not signed with the operator key")
    verify_es256(envelope, operator_key)
    try:
        body = _loads_exact(envelope.payload)
    except Exception:
        raise EnvelopeError("malformed", "command payload is not CBOR") from None
    if not isinstance(body, dict):
        raise EnvelopeError("malformed", "command payload must be a map")
    target = body.get(K_DEVICE)
    if device is not None and target != device:
        raise EnvelopeError("wrong_device", f"command is for {target!r}, not {device}")
    name, args = body.get(K_COMMAND), body.get(K_ARGS, {})
    if not isinstance(target, str) or not _is_uint(body.get(K_SEQ)) or not isinstance(name, str):
        raise EnvelopeError("malformed", "command needs device, seq and command name")
    if not isinstance(args, dict):
        raise EnvelopeError("malformed", "command args must be a map")
    expires = body.get(K_EXPIRES)
    if expires is not None and not _is_uint(expires):
        raise EnvelopeError("malformed", "command expiry (key 12) must be Unix seconds")
    return Command(target, body[K_SEQ], body.get(K_TIME, 0), name, args, expires)


# --- gap records: what the gateway lost, published beside the envelopes ----------

def gap_record(device: str, reason: str, seqs: list[int], received_at: list[float]) -> dict:
    """The JSON object a gateway publishes for envelopes it had to drop (docs/wire-format.md):
    `seqs` of the dropped envelopes whose sequence number is known, `received_at` of all."""
    return {"type": "gap", "device": device, "reason": reason, "count": len(received_at),
            "first_seq": min(seqs, default=None), "last_seq": max(seqs, default=None),
            "first_received_at": min(received_at), "last_received_at": max(received_at)}


def merge_gap_records(old: dict, new: dict) -> dict:
    """One record for two runs of drops of the same device and reason."""
    def pick(f: Callable, a: int | None, b: int | None) -> int | None:
        values = [v for v in (a, b) if v is not None]
        return f(values) if values else None

    return {**old, "count": old["count"] + new["count"],
            "first_seq": pick(min, old.get("first_seq"), new["first_seq"]),
            "last_seq": pick(max, old.get("last_seq"), new["last_seq"]),
            "first_received_at": min(old["first_received_at"], new["first_received_at"]),
            "last_received_at": max(old["last_received_at"], new["last_received_at"])}


# --- signing: for the operator's downlink commands and for tests ---------------

def sign_es256(payload: bytes, kid: str, private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """COSE_Sign1 with a deterministic nonce (RFC 6979) and a low s, as the wire format
    requires (OpenSSL gives the high s of the pair about half the time)."""
    protected = PROTECTED[ALG_ES256]
    tbs = cbor2.dumps(["Signature1", protected, b"", payload])
    r, s = decode_dss_signature(private_key.sign(
        tbs, ec.ECDSA(hashes.SHA256(), deterministic_signing=True)))
    signature = r.to_bytes(32, "big") + low_s(s).to_bytes(32, "big")
    body = [protected, {HDR_KID: kid.encode()}, payload, signature]
    return cbor2.dumps(cbor2.CBORTag(TAG_SIGN1, body))


def low_s(s: int) -> int:
    """The low one of the two s that verify (s and n - s): the only one the wire takes."""
    return P256_N - s if s > HALF_N else s


def mac_hmac(payload: bytes, kid: str, secret: bytes) -> bytes:
    protected = PROTECTED[ALG_HMAC256]
    tag = hmac.new(secret, cbor2.dumps(["MAC0", protected, b"", payload]), hashlib.sha256).digest()
    return cbor2.dumps(cbor2.CBORTag(TAG_MAC0, [protected, {HDR_KID: kid.encode()}, payload, tag]))


def encode_command(device: str, seq: int, command: str, args: dict, time: int,
                   expires: int | None = None) -> bytes:
    body = {K_DEVICE: device, K_SEQ: seq, K_TIME: time, K_COMMAND: command, K_ARGS: args}
    if expires is not None:
        body[K_EXPIRES] = expires
    return cbor2.dumps(body)

"""COSE envelopes (RFC 9052) exactly as docs/wire-format.md fixes them.

Uplink: COSE_Sign1 (tag 18, ES256, signature r || s) or, for the low-power
option, COSE_Mac0 (tag 17, HMAC 256/256); the kid in the unprotected header is
the device id. Downlink: a COSE_Sign1 from the operator key is checked here
before any command runs; every refusal is a ValueError whose text starts with a
short reason, so the caller can count it.
"""

from hashlib import sha256

from node import cbor, p256
from node.hmac256 import equal, hmac_sha256

TAG_SIGN1 = 18
TAG_MAC0 = 17
ALG_ES256 = -7
ALG_HMAC256 = 5
MAX_BYTES = 4096
OPERATOR_KID = "operator"

# the protected headers are constants: bstr of {1: -7} and of {1: 5}, the only ones taken
PROTECTED_ES256 = cbor.encode({1: ALG_ES256})
PROTECTED_HMAC256 = cbor.encode({1: ALG_HMAC256})
MAX_KID_BYTES = 15                      # a device id, cn- and 12 hex digits ("operator": 8)
_HALF_N = p256.N >> 1                   # low-S: a signature's s is at most this


def _encode(item, into):
    """cbor.encode(item), or written over the bytearray `into` (payload.Room's) and that."""
    if into is None:
        return cbor.encode(item)
    into[:] = b""
    cbor.encode_into(into, item)
    return into


def _tbs(context, protected, payload, into=None):
    """Sig_structure / MAC_structure: [context, protected, h'', payload]."""
    return _encode([context, protected, b"", payload], into)


def _envelope(tag, protected, kid, payload, sig, into=None):
    if isinstance(kid, str):
        kid = kid.encode()
    return _encode(cbor.Tag(tag, [protected, cbor.Map([(4, kid)]), payload, sig]), into)


def sign1(payload, kid, key):
    """COSE_Sign1 bytes of `payload` (bytes) signed ES256.

    `key` is a 32-byte private scalar or any object with a sign(msg) -> r||s
    method (keys.NodeKeys), so the private key need not leave its holder.
    """
    tbs = sign1_tbs(payload)
    sig = key.sign(tbs) if hasattr(key, "sign") else p256.sign(key, tbs)
    return sign1_envelope(payload, kid, sig)


def sign1_tbs(payload):
    """The bytes an ES256 signature of a COSE_Sign1 covers (its Sig_structure)."""
    return _tbs("Signature1", PROTECTED_ES256, payload)


def sign1_digest(payload):
    """SHA-256 of sign1_tbs(payload), hashed in two pieces: a window's ~1.1 KB payload is
    not copied once more, an allocation fewer when the heap is tight (at chip speed, a
    MemoryError right there reset nodes)."""
    head = bytearray()
    cbor.append_head(head, 4, 4)            # [context, protected, external_aad, payload]
    for item in ("Signature1", PROTECTED_ES256, b""):
        cbor.encode_into(head, item)
    cbor.append_head(head, 2, len(payload))  # the payload's byte-string head
    digest = sha256(head)
    digest.update(payload)
    return digest.digest()


def sign1_envelope(payload, kid, sig, into=None):
    """COSE_Sign1 bytes of `payload` with `sig` (r || s of sign1_tbs(payload)); with
    `into`, written over that bytearray."""
    return _envelope(TAG_SIGN1, PROTECTED_ES256, kid, payload, sig, into)


def mac0(payload, kid, secret, into=None):
    """COSE_Mac0 bytes of `payload` tagged with HMAC-SHA256; with `into`, written over
    that bytearray (its MAC_structure first).

    `secret` is the key bytes or an object with mac(msg) (keys.NodeKeys).
    """
    tbs = _tbs("MAC0", PROTECTED_HMAC256, payload, into)
    tag = secret.mac(tbs) if hasattr(secret, "mac") else hmac_sha256(secret, tbs)
    return _envelope(TAG_MAC0, PROTECTED_HMAC256, kid, payload, tag, into)


def verify_mac0(envelope, secret, kid=None):
    """Return the payload of a valid COSE_Mac0; ValueError('<reason>: ...') otherwise."""
    protected, payload, tag = _open(envelope, TAG_MAC0, ALG_HMAC256, 32, kid)
    if not equal(hmac_sha256(secret, _tbs("MAC0", protected, payload)), tag):
        raise ValueError("bad_signature: HMAC tag does not match")
    return payload


def verify_sign1(envelope, public_key, kid=None):
    """Return the payload of a COSE_Sign1 that `public_key` (SEC1 bytes) signed.

    Checks, in order: size, structure, the canonical form (the exact protected header
    of ES256, only the kid unprotected, a low s), kid (if given), signature.
    Raises ValueError('<reason>: detail') with reason oversized, malformed or
    bad_signature; nothing in the payload is trusted before that.
    """
    return p256.finish(verify_sign1_steps(envelope, public_key, kid))


def verify_sign1_steps(envelope, public_key, kid=None):
    """verify_sign1() as a generator of steps (node.signer runs it in the event loop)."""
    protected, payload, sig = _open(envelope, TAG_SIGN1, ALG_ES256, 64, kid)
    yield                               # the CBOR work: steps of its own
    tbs = _tbs("Signature1", protected, payload)
    if not (yield from p256.verify_steps(public_key, tbs, sig)):
        raise ValueError("bad_signature: ES256 signature does not verify")
    return payload


def open_command(envelope, operator_key, device):
    """Verify a downlink command for `device` and return its payload map.

    The envelope must be a COSE_Sign1 with kid "operator" signed by
    `operator_key`; the payload must be a map with 1 == device, 2 a uint seq,
    10 a command name, 11 (if present) an args map and 12 (if present) its deadline
    in Unix seconds. Raises ValueError with
    reason oversized, malformed, bad_signature or wrong_device (citynode/wire.py
    REASONS: the host says the same).
    Refusing replays (seq not above the last accepted) is the caller's job:
    seqno.Highest keeps that number across resets.
    """
    return p256.finish(open_command_steps(envelope, operator_key, device))


def peek_command_seq(envelope):
    """A command's sequence number before its signature is checked, None if it has none
    to read: only to refuse a replay without the verify (~1.5 s of the chip's time),
    never to act on."""
    try:
        _, payload, _ = _open(envelope, TAG_SIGN1, ALG_ES256, 64, OPERATOR_KID)
        seq = cbor.decode(payload).get(2)
    except (ValueError, AttributeError):
        return None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def open_command_steps(envelope, operator_key, device):
    """open_command() as a generator of steps: the same checks, the same refusals."""
    body = yield from verify_sign1_steps(envelope, operator_key, kid=OPERATOR_KID)
    try:
        cmd = cbor.decode(body)
    except ValueError as exc:
        raise ValueError("malformed: command payload: %s" % exc)
    if not isinstance(cmd, dict):
        raise ValueError("malformed: command payload must be a map")
    if cmd.get(1) != device:
        raise ValueError("wrong_device: command is for %r" % (cmd.get(1),))
    seq = cmd.get(2)
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError("malformed: command seq must be an unsigned integer")
    if not isinstance(cmd.get(10), str):
        raise ValueError("malformed: command name missing")
    if not isinstance(cmd.get(11, {}), dict):
        raise ValueError("malformed: command args must be a map")
    expires = cmd.get(12)
    if expires is not None and (not isinstance(expires, int) or isinstance(expires, bool)):
        raise ValueError("malformed: command expiry (key 12) must be Unix seconds")
    return cmd


def _open(envelope, tag, alg, sig_len, kid):
    if len(envelope) > MAX_BYTES:
        raise ValueError("oversized: %d bytes" % len(envelope))
    try:
        item = cbor.decode(envelope)
    except ValueError as exc:
        raise ValueError("malformed: %s" % exc)
    if not isinstance(item, cbor.Tag) or item.tag != tag:
        raise ValueError("malformed: not a COSE tag %d" % tag)
    body = item.value
    if not isinstance(body, list) or len(body) != 4:
        raise ValueError("malformed: COSE structure must be an array of 4")
    protected, unprotected, payload, sig = body
    if not (isinstance(protected, bytes) and isinstance(payload, bytes)
            and isinstance(sig, bytes) and isinstance(unprotected, dict)):
        raise ValueError("malformed: wrong COSE field types")
    canonical = PROTECTED_ES256 if alg == ALG_ES256 else PROTECTED_HMAC256
    if protected != canonical:
        raise ValueError("malformed: protected header must be exactly %s ({1: %d})"
                         % (canonical.hex(), alg))
    _check_unprotected(unprotected)
    if kid is not None:
        if isinstance(kid, str):
            kid = kid.encode()
        if unprotected[4] != kid:
            raise ValueError("bad_signature: envelope kid is not %s" % kid.decode())
    if len(sig) != sig_len:
        raise ValueError("malformed: signature must be %d bytes" % sig_len)
    if alg == ALG_ES256 and int.from_bytes(sig[32:], "big") > _HALF_N:
        raise ValueError("malformed: high s (above n/2): the signer must send n - s")
    if cbor.encode(item) != envelope:
        raise ValueError("malformed: not in shortest form (a CBOR head written longer)")
    return protected, payload, sig


def _check_unprotected(unprotected):
    """Only the kid, no longer than a device id: the unprotected header is not signed, so
    anything else in it would be another valid envelope of the same signature."""
    labels = list(unprotected)
    if len(labels) != 1 or type(labels[0]) is not int or labels[0] != 4:
        raise ValueError("malformed: the unprotected header must hold only the kid (4)")
    kid = unprotected[4]
    if not isinstance(kid, bytes) or not 0 < len(kid) <= MAX_KID_BYTES:
        raise ValueError("malformed: the kid must be 1 to %d bytes" % MAX_KID_BYTES)

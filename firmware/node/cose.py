"""COSE envelopes (RFC 9052) exactly as docs/wire-format.md fixes them.

Uplink: COSE_Sign1 (tag 18, ES256, signature r || s) or, for the low-power
option, COSE_Mac0 (tag 17, HMAC 256/256); the kid in the unprotected header is
the device id. Downlink: a COSE_Sign1 from the operator key is checked here
before any command runs; every refusal is a ValueError whose text starts with a
short reason, so the caller can count it.
"""

from node import cbor, p256
from node.hmac256 import equal, hmac_sha256

TAG_SIGN1 = 18
TAG_MAC0 = 17
ALG_ES256 = -7
ALG_HMAC256 = 5
MAX_BYTES = 4096
OPERATOR_KID = "operator"

# the protected headers are constants: bstr of {1: -7} and of {1: 5}
PROTECTED_ES256 = cbor.encode({1: ALG_ES256})
PROTECTED_HMAC256 = cbor.encode({1: ALG_HMAC256})


def _tbs(context, protected, payload):
    """Sig_structure / MAC_structure: [context, protected, h'', payload]."""
    return cbor.encode([context, protected, b"", payload])


def _envelope(tag, protected, kid, payload, sig):
    if isinstance(kid, str):
        kid = kid.encode()
    return cbor.encode(cbor.Tag(tag, [protected, cbor.Map([(4, kid)]), payload, sig]))


def sign1(payload, kid, key):
    """COSE_Sign1 bytes of `payload` (bytes) signed ES256.

    `key` is a 32-byte private scalar or any object with a sign(msg) -> r||s
    method (keys.NodeKeys), so the private key need not leave its holder.
    """
    tbs = _tbs("Signature1", PROTECTED_ES256, payload)
    sig = key.sign(tbs) if hasattr(key, "sign") else p256.sign(key, tbs)
    return _envelope(TAG_SIGN1, PROTECTED_ES256, kid, payload, sig)


def mac0(payload, kid, secret):
    """COSE_Mac0 bytes of `payload` tagged with HMAC-SHA256.

    `secret` is the key bytes or an object with mac(msg) (keys.NodeKeys).
    """
    tbs = _tbs("MAC0", PROTECTED_HMAC256, payload)
    tag = secret.mac(tbs) if hasattr(secret, "mac") else hmac_sha256(secret, tbs)
    return _envelope(TAG_MAC0, PROTECTED_HMAC256, kid, payload, tag)


def verify_mac0(envelope, secret, kid=None):
    """Return the payload of a valid COSE_Mac0; ValueError('<reason>: ...') otherwise."""
    protected, payload, tag = _open(envelope, TAG_MAC0, ALG_HMAC256, 32, kid)
    if not equal(hmac_sha256(secret, _tbs("MAC0", protected, payload)), tag):
        raise ValueError("bad_signature: HMAC tag does not match")
    return payload


def verify_sign1(envelope, public_key, kid=None):
    """Return the payload of a COSE_Sign1 that `public_key` (SEC1 bytes) signed.

    Checks, in order: size, structure, alg is ES256, kid (if given), signature.
    Raises ValueError('<reason>: detail') with reason oversized, malformed, alg,
    kid or bad_signature; nothing in the payload is trusted before that.
    """
    protected, payload, sig = _open(envelope, TAG_SIGN1, ALG_ES256, 64, kid)
    if not p256.verify(public_key, _tbs("Signature1", protected, payload), sig):
        raise ValueError("bad_signature: ES256 signature does not verify")
    return payload


def open_command(envelope, operator_key, device):
    """Verify a downlink command for `device` and return its payload map.

    The envelope must be a COSE_Sign1 with kid "operator" signed by
    `operator_key`; the payload must be a map with 1 == device, 2 a uint seq,
    10 a command name and 11 (if present) an args map. Raises ValueError with
    reason oversized, malformed, bad_signature or wrong_device (citynode/wire.py
    REASONS: the host says the same).
    Refusing replays (seq not above the last accepted) is the caller's job:
    seqno.Highest keeps that number across resets.
    """
    body = verify_sign1(envelope, operator_key, kid=OPERATOR_KID)
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
    try:
        headers = cbor.decode(protected)
    except ValueError:
        raise ValueError("malformed: protected header is not CBOR")
    if not isinstance(headers, dict) or headers.get(1) != alg:
        raise ValueError("malformed: protected alg must be %d" % alg)
    if kid is not None:
        if isinstance(kid, str):
            kid = kid.encode()
        if unprotected.get(4) != kid:
            raise ValueError("bad_signature: envelope kid is not %s" % kid.decode())
    if len(sig) != sig_len:
        raise ValueError("malformed: signature must be %d bytes" % sig_len)
    return protected, payload, sig

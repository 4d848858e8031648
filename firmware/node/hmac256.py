"""HMAC-SHA256 (RFC 2104) on hashlib.sha256: MicroPython ships no hmac module.

Used for COSE_Mac0 envelopes and for the RFC 6979 nonce generator in p256.
"""

from hashlib import sha256

_BLOCK = 64
_IPAD = int.from_bytes(b"\x36" * _BLOCK, "big")
_OPAD = int.from_bytes(b"\x5c" * _BLOCK, "big")


def _pads(key):
    """The key XOR ipad and XOR opad blocks, as one integer XOR each (no byte loop)."""
    if len(key) > _BLOCK:
        key = sha256(key).digest()
    k = int.from_bytes(key, "big") << (8 * (_BLOCK - len(key)))  # zero-padded on the right
    return (k ^ _IPAD).to_bytes(_BLOCK, "big"), (k ^ _OPAD).to_bytes(_BLOCK, "big")


def hmac_sha256(key, msg):
    """Return the 32-byte HMAC-SHA256 tag of `msg` under `key` (both bytes-like)."""
    ipad, opad = _pads(key)
    inner = sha256(ipad)
    inner.update(msg)
    outer = sha256(opad)
    outer.update(inner.digest())
    return outer.digest()


def equal(a, b):
    """Compare two tags in time independent of where they differ (no early exit)."""
    if len(a) != len(b):
        return False
    diff = 0
    for i in range(len(a)):
        diff |= a[i] ^ b[i]
    return diff == 0

"""HMAC-SHA256 (RFC 2104) on hashlib.sha256: MicroPython ships no hmac module.

Used for COSE_Mac0 envelopes and for the RFC 6979 nonce generator in p256.
"""

from hashlib import sha256

_BLOCK = 64


def _pads(key):
    if len(key) > _BLOCK:
        key = sha256(key).digest()
    ipad = bytearray(_BLOCK)
    opad = bytearray(_BLOCK)
    for i in range(len(key)):
        ipad[i] = key[i]
        opad[i] = key[i]
    for i in range(_BLOCK):
        ipad[i] ^= 0x36
        opad[i] ^= 0x5C
    return ipad, opad


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

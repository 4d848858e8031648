"""ECDSA over NIST P-256 (ES256) in MicroPython: the node's uplink signatures and the
check of the operator's downlink commands. The group arithmetic is node.ec.

Each heavy function has a `..._steps` generator (see node.ec) that node.signer runs in
bounded steps inside the event loop; the synchronous API (sign, verify, public_key,
precompute: the self-test and the provisioning receipt, at the REPL) runs the same
generators to their end.

Nonces: sign() is deterministic (RFC 6979, HMAC-SHA256): a weak RNG at signing time
cannot leak the key, and the test vectors hold. The app's signatures are hedged (RFC
6979 section 3.6: fresh randomness, the boot number and a counter as the additional data
k'): node.signer makes nonce pairs (r, k**-1) before the message is known (pair_steps,
sign_with_pair), or a whole hedged signature in steps (sign_steps with `extra`). k**-1
is computed blinded. MicroPython big integers take slightly value-dependent time, so
this is not a constant-time implementation; it needs a local, precise timer to attack,
not a network one.

Signatures are low-S (s <= N / 2, sign_with_pair), as the wire format requires.
Keys are 32-byte big-endian scalars; public keys are SEC1 uncompressed points
(65 bytes, 0x04 | x | y).
"""

import os
from hashlib import sha256

from node import ec
from node.ec import B, N, P, finish, precompute, precompute_steps, set_comb_teeth  # noqa: F401
from node.hmac256 import hmac_sha256

_HALF_N = N >> 1                        # low-S: a signature's s is at most this


# --- keys ------------------------------------------------------------------

def new_private_key():
    """A fresh 32-byte private scalar from os.urandom, by rejection sampling (uniform in [1, N))."""
    while True:
        raw = os.urandom(32)
        d = int.from_bytes(raw, "big")
        if 0 < d < N:
            return raw


def _scalar(priv):
    if len(priv) != 32:
        raise ValueError("private key must be 32 bytes")
    d = int.from_bytes(priv, "big")
    if not 0 < d < N:
        raise ValueError("private key out of range")
    return d


def check_private(priv):
    """Raise ValueError unless `priv` is a valid 32-byte private scalar."""
    _scalar(priv)


def public_key_steps(priv):
    """public_key() in steps."""
    X, Y, Z = yield from ec.mul_base_steps(_scalar(priv))
    x, y = yield from ec.affine_steps(X, Y, Z)
    return b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")


def public_key(priv):
    """The uncompressed SEC1 public point (65 bytes) of a 32-byte private key."""
    return finish(public_key_steps(priv))


def _decode_steps(pub):
    if len(pub) == 65 and pub[0] == 4:
        x = int.from_bytes(pub[1:33], "big")
        y = int.from_bytes(pub[33:65], "big")
    elif len(pub) == 33 and pub[0] in (2, 3):
        x = int.from_bytes(pub[1:33], "big")
        if x >= P:
            raise ValueError("public key x out of range")
        y = yield from ec.pow_steps((x * x * x - 3 * x + B) % P, (P + 1) // 4, P)  # P = 3 mod 4
        if (y & 1) != (pub[0] & 1):
            y = P - y
    else:
        raise ValueError("public key must be a SEC1 point of 65 or 33 bytes")
    if not ec.on_curve(x, y):
        raise ValueError("public key is not on P-256")
    return x, y


def decode_point(pub):
    """(x, y) of an uncompressed (65 B) or compressed (33 B) SEC1 point; ValueError if not on P-256."""
    return finish(_decode_steps(pub))


# --- ECDSA -------------------------------------------------------------------

def _nonces(d, h1, extra=b""):
    """RFC 6979 section 3.2 candidate nonces for qlen = hlen = 256 (HMAC-SHA256); h1 is
    bits2octets(digest), `extra` section 3.6's additional data k' (empty: deterministic)."""
    x = d.to_bytes(32, "big")
    V = b"\x01" * 32
    K = hmac_sha256(b"\x00" * 32, V + b"\x00" + x + h1 + extra)
    V = hmac_sha256(K, V)
    K = hmac_sha256(K, V + b"\x01" + x + h1 + extra)
    V = hmac_sha256(K, V)
    while True:
        V = hmac_sha256(K, V)
        k = int.from_bytes(V, "big")
        if 0 < k < N:
            yield k
        K = hmac_sha256(K, V + b"\x00")
        V = hmac_sha256(K, V)


def _inverse_blinded_steps(k):
    """k**-1 mod N computed as (k*b)**-1 * b for a random b, so its timing says nothing of k."""
    b = 1 + int.from_bytes(os.urandom(32), "big") % (N - 1)
    inv = yield from ec.inv_steps(k * b % N, N)
    return inv * b % N


def _pair_steps(nonces):
    """(r, k**-1 mod N) for the first usable nonce of `nonces`."""
    for k in nonces:
        yield
        X, Y, Z = yield from ec.mul_base_steps(k)
        x, y = yield from ec.affine_steps(X, Y, Z)
        if not ec.on_curve(x, y):       # a fault in k*G: no signature from it
            raise ValueError("k*G is off the curve")
        r = x % N
        if r:
            k_inv = yield from _inverse_blinded_steps(k)
            return r, k_inv


def pair_steps(priv, extra):
    """A nonce pair (r, k**-1 mod N) made before the message is known, in steps.

    k is RFC 6979's HMAC-SHA256 generator keyed by the private key, with no message
    (h1 = 0) and `extra` as the additional data k' (section 3.6): give it fresh
    randomness and a number that never repeats (node.signer: os.urandom, the boot
    number, a counter). A pair signs one message (sign_with_pair), then is forgotten.
    """
    return _pair_steps(_nonces(_scalar(priv), bytes(32), extra))


def sign_with_pair(priv, digest, r, k_inv):
    """r || s of a 32-byte digest with a nonce pair: two multiplications mod N.

    s is the low one of the two that verify, s and N - s (s <= N / 2): the wire format
    takes no other (docs/wire-format.md, canonical envelopes), so nobody can turn one
    envelope into a second valid one. Never give the same pair twice: two signatures
    with one nonce reveal the key. None in the 2**-256 case s == 0 (take another pair).
    """
    s = k_inv * (int.from_bytes(digest, "big") + r * _scalar(priv)) % N
    if s > _HALF_N:
        s = N - s
    if s:
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return None


def sign_steps(priv, digest, extra=b""):
    """ECDSA r || s (64 bytes) of a 32-byte SHA-256 digest, in steps. The nonce is
    RFC 6979's, hedged with `extra` (section 3.6) when given, deterministic without."""
    d = _scalar(priv)
    nonces = _nonces(d, (int.from_bytes(digest, "big") % N).to_bytes(32, "big"), extra)
    while True:
        r, k_inv = yield from _pair_steps(nonces)
        sig = sign_with_pair(priv, digest, r, k_inv)
        if sig:
            return sig


def sign_digest(priv, digest):
    """ECDSA signature r || s (64 bytes) of a 32-byte SHA-256 digest, nonce per RFC 6979."""
    return finish(sign_steps(priv, digest))


def sign(priv, msg):
    """ES256 signature r || s (64 bytes) of `msg`."""
    return sign_digest(priv, sha256(msg).digest())


def verify_steps(pub, msg, sig):
    """verify() in steps (its value is True or False; ValueError if `pub` is no point)."""
    if len(sig) != 64:
        return False
    qx, qy = yield from _decode_steps(pub)
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:], "big")
    if not (0 < r < N and 0 < s < N):
        return False
    e = int.from_bytes(sha256(msg).digest(), "big")
    yield
    w = yield from ec.inv_steps(s, N)
    X, Y, Z = yield from ec.mul_double_steps(e * w % N, r * w % N, qx, qy)
    if not Z:
        return False
    # x(R) mod N == r without an inversion: X == x * Z^2 for x = r or r + N (< P)
    zz = Z * Z % P
    return X == r * zz % P or (r + N < P and X == (r + N) * zz % P)


def verify(pub, msg, sig):
    """True if `sig` (r || s, 64 bytes) is a valid ES256 signature of `msg` by `pub`."""
    return finish(verify_steps(pub, msg, sig))

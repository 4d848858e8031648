"""ECDSA over NIST P-256 (ES256) in MicroPython, for signing every uplink.

Signing is the hot path: one fixed-base multiplication k*G per envelope, done
with a Lim-Lee comb over a table of 2**TEETH - 1 affine multiples of G (64 bytes
each, 16320 bytes for 8 teeth) that is built at first use and kept in 1 KB
bytearrays: no per-point object overhead, and no large block to find in a
fragmented heap. The loop works
in Jacobian coordinates (no inversion inside); one Fermat inversion converts the
result, and another computes k**-1 mod n. Nonces are deterministic (RFC 6979,
HMAC-SHA256): a weak RNG at signing time cannot leak the key.

Verification (operator commands, rare) favours plain code over speed.

Timing: every signature runs the same sequence of field operations (a zero
comb column costs a dummy addition, leading empty columns dummy doublings), so
the loop does not reveal the nonce's length or its zero columns (the Minerva
class of attacks), and k**-1 is computed blinded. MicroPython big integers still
take slightly value-dependent time, so this is not a constant-time
implementation; it needs a local, precise timer to attack, not a network one.

Keys are 32-byte big-endian scalars; public keys are SEC1 uncompressed points
(65 bytes, 0x04 | x | y).
"""

import os
from hashlib import sha256

from micropython import const

from node.hmac256 import hmac_sha256

P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
GX = 0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296
GY = 0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5

TEETH = 8                               # comb rows; the table has 2**TEETH - 1 points
_span = 32                              # comb columns: ceil(256 / TEETH)
_ENTRY = const(64)                      # bytes per affine point in the table
_CHUNK_BITS = const(4)                  # 16 entries (1 KB) per bytearray: no big block needed
_BATCH = const(16)                      # points normalised per inversion while building

_table = None
_dummy = None                           # 3G, the operand of dummy operations


# --- field and group arithmetic (Jacobian: x = X/Z^2, y = Y/Z^3; Z == 0 is infinity)

def _dbl(X, Y, Z):
    """2P with a = -3 (3M + 5S); products are reduced once per formula, not per step."""
    if not Z or not Y:
        return 0, 1, 0
    p = P
    d = Z * Z % p
    g = Y * Y % p
    b = X * g % p
    a = 3 * (X - d) * (X + d) % p
    X3 = (a * a - 8 * b) % p
    return X3, (a * (4 * b - X3) - 8 * g * g) % p, 2 * Y * Z % p


def _madd(X1, Y1, Z1, x2, y2):
    """P + Q with Q affine (the table's points): 8M + 3S, no inversion."""
    if not Z1:
        return x2, y2, 1
    p = P
    zz = Z1 * Z1 % p
    H = (x2 * zz - X1) % p
    R = (y2 * zz * Z1 - Y1) % p
    if not H:
        if not R:
            return _dbl(X1, Y1, Z1)
        return 0, 1, 0
    HH = H * H % p
    HHH = H * HH % p
    V = X1 * HH % p
    X3 = (R * R - HHH - 2 * V) % p
    return X3, (R * (V - X3) - Y1 * HHH) % p, Z1 * H % p


def _add(X1, Y1, Z1, X2, Y2, Z2):
    """P + Q, both Jacobian (used by verify only)."""
    if not Z1:
        return X2, Y2, Z2
    if not Z2:
        return X1, Y1, Z1
    p = P
    z1z1 = Z1 * Z1 % p
    z2z2 = Z2 * Z2 % p
    U1 = X1 * z2z2 % p
    S1 = Y1 * Z2 * z2z2 % p
    H = (X2 * z1z1 - U1) % p
    R = (Y2 * Z1 * z1z1 - S1) % p
    if not H:
        if not R:
            return _dbl(X1, Y1, Z1)
        return 0, 1, 0
    HH = H * H % p
    HHH = H * HH % p
    V = U1 * HH % p
    X3 = (R * R - HHH - 2 * V) % p
    return X3, (R * (V - X3) - S1 * HHH) % p, Z1 * Z2 * H % p


def _affine(X, Y, Z):
    if not Z:
        raise ValueError("point at infinity")
    zi = pow(Z, P - 2, P)
    zi2 = zi * zi % P
    return X * zi2 % P, Y * zi2 * zi % P


def _on_curve(x, y):
    return 0 <= x < P and 0 <= y < P and (y * y - x * x * x + 3 * x - B) % P == 0


# --- fixed-base comb ---------------------------------------------------------

def _put(tab, i, x, y):
    chunk = tab[(i - 1) >> _CHUNK_BITS]
    o = ((i - 1) & ((1 << _CHUNK_BITS) - 1)) * _ENTRY
    chunk[o:o + 32] = x.to_bytes(32, "big")
    chunk[o + 32:o + 64] = y.to_bytes(32, "big")


def _get(tab, i):
    chunk = tab[(i - 1) >> _CHUNK_BITS]
    o = ((i - 1) & ((1 << _CHUNK_BITS) - 1)) * _ENTRY
    return int.from_bytes(chunk[o:o + 32], "big"), int.from_bytes(chunk[o + 32:o + 64], "big")


def _normalise_into(tab, index, jac):
    """Store Jacobian points as table entries index.. with one shared inversion."""
    prefix = []                         # prefix[i] = Z_0 * ... * Z_i
    acc = 1
    for _, _, z in jac:
        acc = acc * z % P
        prefix.append(acc)
    inv = pow(acc, P - 2, P)
    for j in range(len(jac) - 1, -1, -1):
        X, Y, Z = jac[j]
        zi = inv * prefix[j - 1] % P if j else inv
        inv = inv * Z % P
        zi2 = zi * zi % P
        _put(tab, index + j, X * zi2 % P, Y * zi2 * zi % P)


def _build_table():
    """Entry i = sum of 2**(_span*t) * G over the bits t set in i, affine.

    Built row by row: entries with top bit t are entry (i - 2**t) plus the row's
    base point. Each row is normalised with one shared inversion (Montgomery's
    trick) in batches of _BATCH points, so the build needs little transient heap.
    """
    entries = (1 << TEETH) - 1
    per = 1 << _CHUNK_BITS
    tab = [bytearray(min(per, entries - c) * _ENTRY) for c in range(0, entries, per)]
    bx, by = GX, GY
    for t in range(TEETH):
        top = 1 << t
        _put(tab, top, bx, by)
        for first in range(1, top, _BATCH):
            jac = []
            for j in range(first, min(first + _BATCH, top)):
                x, y = _get(tab, j)
                jac.append(_madd(x, y, 1, bx, by))
            _normalise_into(tab, top + first, jac)
        if t + 1 < TEETH:              # next row's base: 2**SPAN times this one
            X, Y, Z = bx, by, 1
            for _ in range(_span):
                X, Y, Z = _dbl(X, Y, Z)
            bx, by = _affine(X, Y, Z)
    return tab


def set_comb_teeth(teeth):
    """Retune the table for a smaller heap: (2**teeth - 1) * 64 bytes; 8 -> 16320 B, 6 -> 4032 B.

    Fewer teeth mean more doublings per signature (ceil(256 / teeth)).
    """
    global TEETH, _span, _table
    if not 1 <= teeth <= 8:
        raise ValueError("teeth must be 1..8")
    TEETH = teeth
    _span = (256 + teeth - 1) // teeth
    _table = None


def precompute():
    """Build the base-point table now (else at first use); returns its size in bytes.

    Best called early at boot, before the heap fragments (the table needs 16
    1 KB blocks).
    """
    global _table, _dummy
    if _table is None:
        _table = _build_table()
        # 3G is no table entry (entries are sums of distinct 2**(span*t) G), so a
        # dummy addition never takes the doubling branch
        _dummy = _affine(*_madd(*_dbl(GX, GY, 1), GX, GY))
    return sum(len(chunk) for chunk in _table)


def _mul_base(k):
    """k*G in Jacobian coordinates, 0 < k < N."""
    tab = _table
    if tab is None:
        precompute()
        tab = _table
    kb = k.to_bytes(32, "big")
    span = _span
    dx, dy = _dummy
    X, Y, Z = 0, 1, 0
    for j in range(span - 1, -1, -1):
        if Z:
            X, Y, Z = _dbl(X, Y, Z)
        else:
            _dbl(dx, dy, 1)             # dummy: same work while the sum is still empty
        i = 0
        b = j + (TEETH - 1) * span
        while b >= 0:                   # bit j of every row, top row first
            i <<= 1
            if b < 256:
                i |= (kb[31 - (b >> 3)] >> (b & 7)) & 1
            b -= span
        n = i - 1 if i else 0
        chunk = tab[n >> _CHUNK_BITS]
        o = (n & ((1 << _CHUNK_BITS) - 1)) * _ENTRY
        x2 = int.from_bytes(chunk[o:o + 32], "big")
        y2 = int.from_bytes(chunk[o + 32:o + 64], "big")
        if i and Z:
            X, Y, Z = _madd(X, Y, Z, x2, y2)
        elif i:
            X, Y, Z = x2, y2, 1
            _madd(dx, dy, 1, x2, y2)    # dummy: the first addition costs the same
        else:
            _madd(dx, dy, 1, x2, y2)    # dummy: a zero column costs an addition too
    return X, Y, Z


def _mul(k, x, y):
    """k*(x, y) for an arbitrary point, 4-bit fixed window (verify only)."""
    win = [(0, 1, 0), (x, y, 1)]
    for _ in range(14):
        X, Y, Z = win[-1]
        win.append(_madd(X, Y, Z, x, y))
    X, Y, Z = 0, 1, 0
    for shift in range(252, -1, -4):
        for _ in range(4):
            X, Y, Z = _dbl(X, Y, Z)
        d = (k >> shift) & 15
        if d:
            X2, Y2, Z2 = win[d]
            X, Y, Z = _add(X, Y, Z, X2, Y2, Z2)
    return X, Y, Z


# --- keys --------------------------------------------------------------------

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


def public_key(priv):
    """The uncompressed SEC1 public point (65 bytes) of a 32-byte private key."""
    x, y = _affine(*_mul_base(_scalar(priv)))
    return b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")


def decode_point(pub):
    """(x, y) of an uncompressed (65 B) or compressed (33 B) SEC1 point; ValueError if not on P-256."""
    if len(pub) == 65 and pub[0] == 4:
        x = int.from_bytes(pub[1:33], "big")
        y = int.from_bytes(pub[33:65], "big")
    elif len(pub) == 33 and pub[0] in (2, 3):
        x = int.from_bytes(pub[1:33], "big")
        if x >= P:
            raise ValueError("public key x out of range")
        y = pow((x * x * x - 3 * x + B) % P, (P + 1) // 4, P)  # P = 3 mod 4
        if (y & 1) != (pub[0] & 1):
            y = P - y
    else:
        raise ValueError("public key must be a SEC1 point of 65 or 33 bytes")
    if not _on_curve(x, y):
        raise ValueError("public key is not on P-256")
    return x, y


# --- ECDSA -------------------------------------------------------------------

def _nonces(d, digest):
    """RFC 6979 §3.2 candidate nonces for qlen = hlen = 256 (HMAC-SHA256)."""
    x = d.to_bytes(32, "big")
    h1 = (int.from_bytes(digest, "big") % N).to_bytes(32, "big")
    V = b"\x01" * 32
    K = hmac_sha256(b"\x00" * 32, V + b"\x00" + x + h1)
    V = hmac_sha256(K, V)
    K = hmac_sha256(K, V + b"\x01" + x + h1)
    V = hmac_sha256(K, V)
    while True:
        V = hmac_sha256(K, V)
        k = int.from_bytes(V, "big")
        if 0 < k < N:
            yield k
        K = hmac_sha256(K, V + b"\x00")
        V = hmac_sha256(K, V)


def _inverse_blinded(k):
    """k**-1 mod N computed as (k*b)**-1 * b for a random b, so its timing says nothing of k."""
    b = 1 + int.from_bytes(os.urandom(32), "big") % (N - 1)
    return pow(k * b % N, N - 2, N) * b % N


def sign_digest(priv, digest):
    """ECDSA signature r || s (64 bytes) of a 32-byte SHA-256 digest, nonce per RFC 6979."""
    d = _scalar(priv)
    e = int.from_bytes(digest, "big")
    for k in _nonces(d, digest):
        x, _ = _affine(*_mul_base(k))
        r = x % N
        if not r:
            continue
        s = _inverse_blinded(k) * (e + r * d) % N
        if s:
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def sign(priv, msg):
    """ES256 signature r || s (64 bytes) of `msg`."""
    return sign_digest(priv, sha256(msg).digest())


def verify(pub, msg, sig):
    """True if `sig` (r || s, 64 bytes) is a valid ES256 signature of `msg` by `pub`."""
    if len(sig) != 64:
        return False
    qx, qy = decode_point(pub)
    r = int.from_bytes(sig[:32], "big")
    s = int.from_bytes(sig[32:], "big")
    if not (0 < r < N and 0 < s < N):
        return False
    e = int.from_bytes(sha256(msg).digest(), "big")
    w = pow(s, N - 2, N)
    X1, Y1, Z1 = _mul_base(e * w % N) if e % N else (0, 1, 0)
    X2, Y2, Z2 = _mul(r * w % N, qx, qy)
    X, Y, Z = _add(X1, Y1, Z1, X2, Y2, Z2)
    if not Z:
        return False
    return _affine(X, Y, Z)[0] % N == r

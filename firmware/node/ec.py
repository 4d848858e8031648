"""P-256 group arithmetic for node.p256, as generators of steps.

Every heavy operation yields after each point operation (or 16 exponent bits of an
inversion), so node.signer can run it in an asyncio task that never holds the event
loop longer than one step; finish() runs one to its end (the synchronous API).

Points are Jacobian (x = X/Z^2, y = Y/Z^3; Z == 0 is infinity) inside a loop and affine
in tables. k*G uses a Lim-Lee comb over a table of 2**TEETH - 1 affine multiples of G
(64 bytes each; 4 teeth: 960 bytes, docs/decisions.md says why not 8), built at first
use, with the same operations whatever k (a zero column costs a dummy addition, leading
empty columns dummy doublings: no Minerva-style leak of the nonce's length). u1*G + u2*Q
(verification) is one chain of 256 doublings (Shamir's trick): Q enters through a 4-bit
window, G through the comb's columns in the chain's last doublings. Inversions are
Fermat's, with a 4-bit window.
"""

from micropython import const

P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
GX = 0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296
GY = 0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5

TEETH = 4                               # comb rows; the table has 2**TEETH - 1 points
_span = 64                              # comb columns: ceil(256 / TEETH)
_ENTRY = const(64)                      # bytes per affine point in the table
_CHUNK_BITS = const(4)                  # 16 entries (1 KB) per bytearray: no big block needed
_BATCH = const(16)                      # points normalised per inversion while building
_POW_STEP = const(16)                   # exponent bits per step of an inversion

_table = None
_dummy = None                           # 3G, the operand of dummy operations


def finish(steps):
    """Run a generator of steps to its end and return its value (the synchronous API)."""
    try:
        while True:
            next(steps)
    except StopIteration as end:
        return end.value


# --- field and group arithmetic

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


def pow_steps(a, e, m):
    """a**e mod m for 0 <= e < 2**256: a 4-bit fixed window, a step per 16 exponent bits.

    The exponents are public (m - 2, (P + 1) / 4); the base may be secret.
    """
    a %= m
    win = [1, a]
    for _ in range(14):
        win.append(win[-1] * a % m)
    yield
    r = 1
    for shift in range(252, -1, -4):
        r = r * r % m
        r = r * r % m
        r = r * r % m
        r = r * r % m
        d = (e >> shift) & 15
        if d:
            r = r * win[d] % m
        if not shift % _POW_STEP:
            yield
    return r


def inv_steps(a, m):
    """a**-1 mod m (m prime, a not 0 mod m), by Fermat."""
    return (yield from pow_steps(a, m - 2, m))


def affine_steps(X, Y, Z):
    """(x, y) of a Jacobian point."""
    if not Z:
        raise ValueError("point at infinity")
    zi = yield from inv_steps(Z, P)
    zi2 = zi * zi % P
    return X * zi2 % P, Y * zi2 * zi % P


def on_curve(x, y):
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


def _normalise_steps(tab, index, jac):
    """Store Jacobian points as table entries index.. with one shared inversion."""
    prefix = []                         # prefix[i] = Z_0 * ... * Z_i
    acc = 1
    for _, _, z in jac:
        acc = acc * z % P
        prefix.append(acc)
    inv = yield from inv_steps(acc, P)
    for j in range(len(jac) - 1, -1, -1):
        X, Y, Z = jac[j]
        zi = inv * prefix[j - 1] % P if j else inv
        inv = inv * Z % P
        zi2 = zi * zi % P
        _put(tab, index + j, X * zi2 % P, Y * zi2 * zi % P)
        yield


def _build_steps():
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
                yield
            yield from _normalise_steps(tab, top + first, jac)
        if t + 1 < TEETH:              # next row's base: 2**SPAN times this one
            X, Y, Z = bx, by, 1
            for _ in range(_span):
                X, Y, Z = _dbl(X, Y, Z)
                yield
            bx, by = yield from affine_steps(X, Y, Z)
    return tab


def set_comb_teeth(teeth):
    """Retune the table: (2**teeth - 1) * 64 bytes; 4 -> 960 B, 6 -> 4032 B, 8 -> 16320 B.

    Fewer teeth mean more point operations per k*G (2 * ceil(256 / teeth)).
    """
    global TEETH, _span, _table
    if not 1 <= teeth <= 8:
        raise ValueError("teeth must be 1..8")
    TEETH = teeth
    _span = (256 + teeth - 1) // teeth
    _table = None


def precompute_steps():
    """precompute() in steps; its value is the table's size in bytes."""
    global _table, _dummy
    while _table is None:
        teeth = TEETH
        tab = yield from _build_steps()
        if _dummy is None:
            # 3G is no table entry (entries are sums of distinct 2**(span*t) G), so a
            # dummy addition never takes the doubling branch
            X, Y, Z = _dbl(GX, GY, 1)
            yield
            X, Y, Z = _madd(X, Y, Z, GX, GY)
            yield
            _dummy = yield from affine_steps(X, Y, Z)
        if _table is None and teeth == TEETH:   # not retuned, nor built by another caller
            _table = tab
        yield
    return sum(len(chunk) for chunk in _table)


def precompute():
    """Build the base-point table now (else at first use); returns its size in bytes."""
    return finish(precompute_steps())


def _column(kb, j, span, teeth):
    """Comb column j of the 32-byte scalar kb: bit j of every row, top row first."""
    i = 0
    b = j + (teeth - 1) * span
    while b >= 0:
        i <<= 1
        if b < 256:
            i |= (kb[31 - (b >> 3)] >> (b & 7)) & 1
        b -= span
    return i


def mul_base_steps(k):
    """k*G in Jacobian coordinates, 0 < k < N: a step per point operation, the same
    operations for every k."""
    if _table is None:
        yield from precompute_steps()
    tab = _table
    kb = k.to_bytes(32, "big")
    span = _span
    teeth = TEETH
    dx, dy = _dummy
    X, Y, Z = 0, 1, 0
    for j in range(span - 1, -1, -1):
        if Z:
            X, Y, Z = _dbl(X, Y, Z)
        else:
            _dbl(dx, dy, 1)             # dummy: same work while the sum is still empty
        yield
        i = _column(kb, j, span, teeth)
        x2, y2 = _get(tab, i if i else 1)
        if i and Z:
            X, Y, Z = _madd(X, Y, Z, x2, y2)
        elif i:
            X, Y, Z = x2, y2, 1
            _madd(dx, dy, 1, x2, y2)    # dummy: the first addition costs the same
        else:
            _madd(dx, dy, 1, x2, y2)    # dummy: a zero column costs an addition too
        yield
    return X, Y, Z


def mul_double_steps(u1, u2, qx, qy):
    """u1*G + u2*Q (Jacobian) for verification (public scalars): one chain of 256
    doublings; u2 enters through a 4-bit window of Q's multiples, u1 through the comb's
    columns in the last _span doublings. A step per point operation."""
    if _table is None:
        yield from precompute_steps()
    tab = _table
    span = _span
    teeth = TEETH
    win = [None, (qx, qy, 1), _dbl(qx, qy, 1)]
    yield
    for _ in range(13):
        X, Y, Z = win[-1]
        win.append(_madd(X, Y, Z, qx, qy))
        yield
    kb = u1.to_bytes(32, "big")
    X, Y, Z = 0, 1, 0
    for b in range(255, -1, -1):
        if Z:
            X, Y, Z = _dbl(X, Y, Z)
            yield
        if not b & 3:
            d = (u2 >> b) & 15
            if d:
                X2, Y2, Z2 = win[d]
                X, Y, Z = _add(X, Y, Z, X2, Y2, Z2)
                yield
        if b < span:
            i = _column(kb, b, span, teeth)
            if i:
                x2, y2 = _get(tab, i)
                X, Y, Z = _madd(X, Y, Z, x2, y2)
                yield
    return X, Y, Z

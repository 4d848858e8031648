"""Minimal CBOR (RFC 8949) encoder and decoder for the node's wire format.

Only what the node sends and receives: ints up to 64 bits (negative too), byte
and text strings, arrays, maps, tags, floats, bools and null. Definite lengths
only on output; the decoder also refuses indefinite lengths (nobody sends them
to a node), trailing bytes and nesting deeper than MAX_DEPTH, so bad input ends
in ValueError, never in a crash or a runaway recursion.

Map order: MicroPython dicts do not keep insertion order, so a plain dict is
written with its keys sorted by their encoded bytes (RFC 8949 §4.2.1, the same
on every port); an OrderedDict or a `Map` (list of pairs) is written in the
order given.

Floats: the ESP32 port computes in float32, so a float is written as float32
(0xfa) on every port, which keeps the unix port (emulator) byte-identical to a
board; an integral float (21.0) is written as the integer (21), shorter and exact.
"""

import struct

try:
    from collections import OrderedDict
except ImportError:  # pragma: no cover - every port we use has it
    OrderedDict = None

MAX_DEPTH = 16
_U64 = 0x10000000000000000


class Tag:
    """A tagged item, e.g. Tag(18, [...]) for COSE_Sign1."""

    def __init__(self, tag, value):
        self.tag = tag
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Tag) and self.tag == other.tag and self.value == other.value

    def __repr__(self):
        return "Tag(%d, %r)" % (self.tag, self.value)


class Map:
    """A map written in exactly the order of `pairs` (a list of (key, value))."""

    def __init__(self, pairs):
        self.pairs = pairs


def append_head(buf, major, n):
    """The head of an item of `major` type with argument `n` (a length, a count, a uint)."""
    mt = major << 5
    if n < 24:
        buf.append(mt | n)
    elif n < 0x100:
        buf.append(mt | 24)
        buf.append(n)
    elif n < 0x10000:
        buf.append(mt | 25)
        buf.extend(n.to_bytes(2, "big"))
    elif n < 0x100000000:
        buf.append(mt | 26)
        buf.extend(n.to_bytes(4, "big"))
    elif n < _U64:
        buf.append(mt | 27)
        buf.extend(n.to_bytes(8, "big"))
    else:
        raise ValueError("integer does not fit in 64 bits")


def _pairs_sorted(d):
    items = []
    for k in d:
        items.append((encode(k), d[k]))
    items.sort(key=lambda kv: kv[0])
    return items


def _enc(buf, obj):
    if obj is None:
        buf.append(0xF6)
    elif obj is True:
        buf.append(0xF5)
    elif obj is False:
        buf.append(0xF4)
    elif isinstance(obj, int):
        if obj >= 0:
            append_head(buf, 0, obj)
        else:
            append_head(buf, 1, -1 - obj)
    elif isinstance(obj, float):
        _enc_float(buf, obj)
    elif isinstance(obj, str):
        encode_text_into(buf, obj)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        append_head(buf, 2, len(obj))
        buf.extend(obj)
    elif isinstance(obj, (list, tuple)):
        append_head(buf, 4, len(obj))
        for item in obj:
            _enc(buf, item)
    elif isinstance(obj, Map):
        append_head(buf, 5, len(obj.pairs))
        for k, v in obj.pairs:
            _enc(buf, k)
            _enc(buf, v)
    elif OrderedDict is not None and isinstance(obj, OrderedDict) and type(obj) is not dict:
        append_head(buf, 5, len(obj))
        for k in obj:
            _enc(buf, k)
            _enc(buf, obj[k])
    elif isinstance(obj, dict):
        append_head(buf, 5, len(obj))
        for raw, v in _pairs_sorted(obj):
            buf.extend(raw)
            _enc(buf, v)
    elif isinstance(obj, Tag):
        append_head(buf, 6, obj.tag)
        _enc(buf, obj.value)
    else:
        raise TypeError("cannot encode %s as CBOR" % type(obj).__name__)


def _enc_float(buf, x):
    # integral and finite: write the integer (x != x is NaN; x - x != 0 is inf)
    if x == x and x - x == 0 and x == int(x) and -_U64 < x < _U64:
        _enc(buf, int(x))
        return
    buf.append(0xFA)
    buf.extend(struct.pack(">f", x))


def encode(obj):
    """Return the CBOR encoding of `obj` as bytes."""
    buf = bytearray()
    _enc(buf, obj)
    return bytes(buf)


def encode_into(buf, obj):
    """Append the CBOR encoding of `obj` to the bytearray `buf` (spares a copy)."""
    _enc(buf, obj)


def encode_text_into(buf, text):
    """Append the str `text`, past encode_into's tests of its type: a record's name and
    unit are most of an event's payload, which is sealed in the audio's turn."""
    raw = text.encode()
    append_head(buf, 3, len(raw))
    buf.extend(raw)


# --- decoding ------------------------------------------------------------------

def _half(h):
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if exp == 0:
        val = mant * 2.0 ** -24
    elif exp == 31:
        val = float("inf") if mant == 0 else float("nan")
    else:
        val = (mant + 1024) * 2.0 ** (exp - 25)
    return -val if h & 0x8000 else val


class _Reader:
    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, n):
        end = self.pos + n
        if end > len(self.data):
            raise ValueError("CBOR truncated")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def arg(self, info):
        if info < 24:
            return info
        if info == 24:
            return self.take(1)[0]
        if info == 25:
            return int.from_bytes(self.take(2), "big")
        if info == 26:
            return int.from_bytes(self.take(4), "big")
        if info == 27:
            return int.from_bytes(self.take(8), "big")
        raise ValueError("CBOR indefinite length or reserved info %d" % info)

    def item(self, depth):
        if depth > MAX_DEPTH:
            raise ValueError("CBOR nested too deep")
        ib = self.take(1)[0]
        major = ib >> 5
        info = ib & 0x1F
        if major == 7:
            return self.simple(info)
        n = self.arg(info)
        if major == 0:
            return n
        if major == 1:
            return -1 - n
        if major == 2:
            return bytes(self.take(n))
        if major == 3:
            try:
                return str(self.take(n), "utf-8")
            except UnicodeError:
                raise ValueError("CBOR text is not UTF-8")
        if major == 4:
            if n > len(self.data) - self.pos:  # each item takes at least one byte
                raise ValueError("CBOR truncated")
            return [self.item(depth + 1) for _ in range(n)]
        if major == 5:
            if 2 * n > len(self.data) - self.pos:
                raise ValueError("CBOR truncated")
            out = {}
            for _ in range(n):
                k = self.item(depth + 1)
                v = self.item(depth + 1)
                try:
                    if k in out:
                        raise ValueError("CBOR map has a duplicate key")
                    out[k] = v
                except TypeError:
                    raise ValueError("CBOR map key is not hashable")
            return out
        return Tag(n, self.item(depth + 1))  # major 6

    def simple(self, info):
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22 or info == 23:
            return None
        if info == 25:
            return _half(int.from_bytes(self.take(2), "big"))
        if info == 26:
            return struct.unpack(">f", self.take(4))[0]
        if info == 27:
            return struct.unpack(">d", self.take(8))[0]
        raise ValueError("CBOR simple value %d not supported" % info)


def decode(data):
    """Decode exactly one CBOR item from `data`; ValueError on anything malformed."""
    r = _Reader(data)
    obj = r.item(0)
    if r.pos != len(data):
        raise ValueError("CBOR has %d trailing bytes" % (len(data) - r.pos))
    return obj

"""The uplink payload map (docs/wire-format.md): keys 0..7, SenML records with CBOR labels,
and seal() / seal_async(): the builders of the node's signed envelopes (the self-test's /
the running app's).

Records are tuples (name, unit, value) or (name, unit, value, t), or dicts with
SenML names ("n", "u", "v", "vs", "vb", "s", "t", "bn", "bt", "bu") or their
integer labels. The value's type picks the field (tuple value, or dict "v"):
str -> vs, bool -> vb, number -> v. A unit of None is left out. Output is deterministic: the payload's
keys ascend, a tuple record is written n, u, v, t, and a dict record's labels are
sorted by their encoded bytes (non-negative labels first, then bn, bt, bu).
"""

import asyncio

from node import cbor, cose
from node.clock import CLOCK
from node.ec import finish
from node.signer import run_steps

_STEP = 8                               # records encoded per step (~6 ms of the chip's time)
ROOM_BYTES = 1536                       # a window's payload (~1.1 KB), with room to grow
WIRE_VERSION = 2                        # payload key 0; 2: time in ms, uptime in full

KIND_READINGS = 0
KIND_EVENT = 1
KIND_STATUS = 2
KIND_SELFTEST = 3

BN = -2
BT = -3
BU = -4
N = 0
U = 1
V = 2
VS = 3
VB = 4
S = 5
T = 6

LABELS = {"bn": BN, "bt": BT, "bu": BU, "n": N, "u": U, "v": V, "vs": VS, "vb": VB,
          "s": S, "t": T}


def _value_label(value):
    if isinstance(value, str):
        return VS
    if value is True or value is False:
        return VB
    if isinstance(value, (int, float)):
        return V
    raise TypeError("SenML value must be a number, str or bool")


def _record_into(buf, rec):
    """One SenML record appended to `buf` as a CBOR map with integer labels, in a fixed
    order. A (name, unit, value[, time]) tuple is written straight in, with no map
    object in between: half the time, and a window's 20-30 records and an event's nine
    are most of a seal's (an impulse is sealed in the audio's turn)."""
    if isinstance(rec, dict):
        cbor.encode_into(buf, _dict_record(rec))
        return
    name, unit, value = rec[0], rec[1], rec[2]
    t = rec[3] if len(rec) > 3 else None
    label = _value_label(value)         # raises before anything is written
    if not isinstance(name, str) or not (unit is None or isinstance(unit, str)):
        raise TypeError("SenML name and unit must be str")
    buf.append(0xA2 + (unit is not None) + (t is not None))    # a map of 2-4 pairs
    buf.append(N)                       # the labels (0..6) are one byte each
    cbor.encode_text_into(buf, name)
    if unit is not None:
        buf.append(U)
        cbor.encode_text_into(buf, unit)
    buf.append(label)
    cbor.encode_into(buf, value)
    if t is not None:
        buf.append(T)
        cbor.encode_into(buf, t)


def _dict_record(rec):
    pairs = []
    for key in rec:
        label = LABELS.get(key, key)
        if not isinstance(label, int):
            raise ValueError("unknown SenML field %r" % key)
        value = rec[key]
        if label == V:
            label = _value_label(value)
        if value is not None:
            pairs.append((cbor.encode(label), label, value))
    pairs.sort(key=lambda p: p[0])
    return cbor.Map([(label, value) for _, label, value in pairs])


def encode_payload(device, seq, boot, uptime_ms, kind, records, time_ms=None):
    """The payload bytes: {0: 2, 1: device, 2: seq, 3: boot, [4: Unix ms], 5: uptime_ms,
    6: kind, 7: records}."""
    return finish(encode_steps(device, seq, boot, uptime_ms, kind, records, time_ms))


def encode_steps(device, seq, boot, uptime_ms, kind, records, time_ms=None, into=None):
    """encode_payload() as a generator: a step per _STEP records (a window's 20-30 records
    are ~20 ms of the chip's time in one piece: python -m tests.firmware_step_costs). With `into` (a bytearray: Room.body) the
    payload is written there and that is the value, not a copy."""
    if not isinstance(device, str):
        raise ValueError("device must be a str")
    for n in (seq, boot, uptime_ms, kind):
        if not isinstance(n, int) or n < 0:
            raise ValueError("seq, boot, uptime_ms and kind must be unsigned integers")
    if time_ms is not None and (not isinstance(time_ms, int) or time_ms < 0):
        raise ValueError("time_ms must be Unix milliseconds (an int >= 0) or None")
    pairs = [(0, WIRE_VERSION), (1, device), (2, seq), (3, boot)]
    if time_ms is not None:
        pairs.append((4, time_ms))
    pairs.append((5, uptime_ms))
    pairs.append((6, kind))
    # the map with a null (one byte) per record, then each null replaced by its record
    pairs.append((7, [None] * len(records)))
    head = cbor.encode(cbor.Map(pairs))
    buf = bytearray() if into is None else into
    buf[:] = head[:len(head) - len(records)]
    if len(records) > _STEP:
        yield
    for i in range(len(records)):
        _record_into(buf, records[i])
        if i % _STEP == _STEP - 1:
            yield
    return buf if into is not None else bytes(buf)


class Room:
    """Where the app builds its window envelopes: two bytearrays with room for one, made
    once at boot while the heap is whole and reused. Built in the heap as it is after
    hours, a window wanted a free block of its own size four times over (the payload
    growing, its copy, the envelope, its copy): at chip speed a fragmented heap had none
    for 3 windows in 10 minutes. Built here, it needs one: the spool's copy. A payload
    over ROOM_BYTES grows its buffer, which keeps that size."""

    def __init__(self, size=ROOM_BYTES):
        self.body = _empty(size)
        self.envelope = _empty(size + 128)      # + the COSE head and the signature


def _empty(size):
    """A bytearray of length 0 with room for `size` bytes: filling it allocates nothing."""
    buf = bytearray(size)
    buf[:] = b""
    return buf


def seal(device, seq, key, kind, records, uptime_ms=None, alg="ES256"):
    """A signed envelope of `records`: the payload with seq.next() and seq.boot (a
    seqno.Sequence), the uptime (now unless given, node.clock's: never wrapping), its Unix
    time in ms once the clock is synced (absent before), then COSE_Sign1 (ES256) or, for alg HMAC256, COSE_Mac0
    with the node's key (keys.NodeKeys)."""
    body = finish(_body_steps(device, seq, kind, records, uptime_ms))
    if alg == "HMAC256":
        return cose.mac0(body, device, key)
    return cose.sign1(body, device, key)


async def seal_async(device, seq, signer, kind, records, uptime_ms=None, alg="ES256",
                     urgent=False, room=None):
    """seal() for the running app, in pieces of ~15 ms of the chip's time at most: the
    payload a few records at a time, then the signature through `signer`
    (node.signer.Signer): with a nonce pair at once when there is one for it (urgent:
    an impulse event), else in steps. An urgent payload (an event's nine records, ~9 ms
    of the chip's time) is built in one piece: each step costs a turn of the loop.
    With `room` (a Room) the envelope is built in it and is its bytearray, valid until
    the room's next envelope: queue it (the spool copies) before sealing another."""
    steps = _body_steps(device, seq, kind, records, uptime_ms, room.body if room else None)
    if urgent:      # one turn with its pair's signature: each turn more is the loop's
        body = finish(steps)
    else:
        body = await run_steps(steps)
        await asyncio.sleep_ms(0)
    into = room.envelope if room else None
    if alg == "HMAC256":
        return cose.mac0(body, device, signer, into)
    sig = await signer.sign_digest(cose.sign1_digest(body), urgent)
    return cose.sign1_envelope(body, device, sig, into)


def _body_steps(device, seq, kind, records, uptime_ms, into=None):
    if uptime_ms is None:
        uptime_ms = CLOCK.uptime_ms()
    return encode_steps(device, seq.next(), seq.boot, uptime_ms, kind, records,
                        CLOCK.wall_ms_at(uptime_ms), into)

"""Host side of the wire format: citynode/wire.py and pycose against tests/vectors/wire.json."""

from __future__ import annotations

import json
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pycose.keys import EC2Key, SymmetricKey
from pycose.messages import Mac0Message, Sign1Message

from citynode import wire
from citynode.wire import EnvelopeError
from tests.vectors import make_wire_vectors

VECTORS = json.loads((Path(__file__).parent / "vectors" / "wire.json").read_text())
NODE = VECTORS["node"]
DEVICE = NODE["device"]
SECRET = bytes.fromhex(NODE["hmac_secret"])
PAYLOAD_IDS = [v["name"] for v in VECTORS["payloads"]]


def _public(hex_point: str) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes.fromhex(hex_point))


NODE_PUB = _public(NODE["public_key"])
OPERATOR_PUB = _public(VECTORS["command"]["operator_public_key"])


def _cose_ec2(hex_point: str) -> EC2Key:
    raw = bytes.fromhex(hex_point)
    return EC2Key(crv="P_256", x=raw[1:33], y=raw[33:65])


def _reason(fn, *args) -> str:
    with pytest.raises(EnvelopeError) as err:
        fn(*args)
    return err.value.reason


def test_committed_vectors_are_what_the_host_generates():
    # deterministic ECDSA: regenerating gives the same bytes, so the file cannot drift
    assert make_wire_vectors.build() == VECTORS


@pytest.mark.parametrize("vec", VECTORS["payloads"], ids=PAYLOAD_IDS)
def test_sign1_vector_decodes_and_verifies(vec):
    env = wire.decode_envelope(bytes.fromhex(vec["sign1"]))
    assert (env.alg, env.kid, env.is_hmac) == (wire.ALG_ES256, DEVICE, False)
    assert env.payload == bytes.fromhex(vec["payload"])
    wire.verify_es256(env, NODE_PUB)
    body = wire.decode_payload(env)
    inp = vec["input"]
    assert (body.device, body.seq, body.boot, body.uptime_ms, body.kind, body.time_ms) == (
        inp["device"], inp["seq"], inp["boot"], inp["uptime_ms"], inp["kind"], inp.get("time_ms"))
    assert body.version == 2
    assert len(body.records) == len(inp["records"])


@pytest.mark.parametrize("vec", VECTORS["payloads"], ids=PAYLOAD_IDS)
def test_mac0_vector_decodes_and_verifies(vec):
    env = wire.decode_envelope(bytes.fromhex(vec["mac0"]))
    assert (env.alg, env.kid, env.is_hmac) == (wire.ALG_HMAC256, DEVICE, True)
    wire.verify_hmac(env, SECRET)
    assert _reason(wire.verify_hmac, env, SECRET[:-1] + b"\x00") == "bad_signature"


@pytest.mark.parametrize("vec", VECTORS["payloads"], ids=PAYLOAD_IDS)
def test_pycose_verifies_the_vectors(vec):
    sign1 = Sign1Message.decode(bytes.fromhex(vec["sign1"]))
    sign1.key = _cose_ec2(NODE["public_key"])
    assert sign1.verify_signature()
    assert sign1.payload == bytes.fromhex(vec["payload"])
    mac0 = Mac0Message.decode(bytes.fromhex(vec["mac0"]))
    mac0.key = SymmetricKey(k=SECRET)
    assert mac0.verify_tag()
    # and pycose refuses the same envelope under the operator key
    sign1.key = _cose_ec2(VECTORS["command"]["operator_public_key"])
    assert not sign1.verify_signature()


def test_payload_records_use_senml_cbor_labels_and_float32():
    raw = bytes.fromhex(VECTORS["payloads"][0]["payload"])
    body = cbor2.loads(raw)
    assert list(body) == [0, 1, 2, 3, 4, 5, 6, 7] and body[0] == 2
    assert body[7][0] == {0: "light/lux", 1: "lx", 2: 412.5}
    assert body[7][5][2] == pytest.approx(81.1, abs=1e-5)    # float32, not float64
    assert body[7][3][2] == 12 and isinstance(body[7][3][2], int)  # integral -> int
    assert bytes.fromhex("fa42a23333") in raw                 # 81.1 as float32 (0xfa)
    status = cbor2.loads(bytes.fromhex(VECTORS["payloads"][2]["payload"]))
    assert 4 in status and status[7][0] == {0: "wifi", 1: "dBm", 2: -67, -2: "status/"}
    assert status[7][2] == {0: "lamp", 4: True}
    event = cbor2.loads(bytes.fromhex(VECTORS["payloads"][1]["payload"]))
    assert wire.K_TIME not in event and event[7][0][6] == -0.125


def test_command_vector_verifies_and_signing_is_deterministic():
    cmd = VECTORS["command"]
    env = wire.decode_envelope(bytes.fromhex(cmd["sign1"]))
    assert env.kid == wire.OPERATOR_KID
    wire.verify_es256(env, OPERATOR_PUB)
    assert _reason(wire.verify_es256, env, NODE_PUB) == "bad_signature"
    body = cbor2.loads(env.payload)
    inp = cmd["input"]
    assert body == {1: inp["device"], 2: inp["seq"], 4: inp["time"], 10: inp["command"],
                    11: inp["args"]}
    key = ec.derive_private_key(int(cmd["operator_private_key"], 16), ec.SECP256R1())
    assert wire.sign_es256(env.payload, "operator", key).hex() == cmd["sign1"]
    msg = Sign1Message.decode(bytes.fromhex(cmd["sign1"]))
    msg.key = _cose_ec2(cmd["operator_public_key"])
    assert msg.verify_signature()


def test_host_signer_gives_the_low_s():
    # operator commands are signed here: the node refuses a high s as the gateway does
    key = ec.derive_private_key(int(VECTORS["command"]["operator_private_key"], 16),
                                ec.SECP256R1())
    for i in range(16):
        env = wire.decode_envelope(wire.sign_es256(b"%d" % i, wire.OPERATOR_KID, key))
        wire.verify_es256(env, OPERATOR_PUB)
        assert int.from_bytes(env.signature[32:], "big") <= wire.HALF_N


# --- bad input: every failure is an EnvelopeError with the reason the gateway counts

SIGN1 = bytes.fromhex(VECTORS["payloads"][0]["sign1"])
MAC0 = bytes.fromhex(VECTORS["payloads"][0]["mac0"])
PAYLOAD = bytes.fromhex(VECTORS["payloads"][0]["payload"])
PROT_ES256 = cbor2.dumps({1: -7})


def _sign1(protected=PROT_ES256, unprotected=None, payload=PAYLOAD, sig=b"\x00" * 64, tag=18):
    unprotected = {4: DEVICE.encode()} if unprotected is None else unprotected
    return cbor2.dumps(cbor2.CBORTag(tag, [protected, unprotected, payload, sig]))


def test_oversized_is_refused_before_parsing():
    assert _reason(wire.decode_envelope, SIGN1 + b"\x00" * (4097 - len(SIGN1))) == "oversized"
    assert _reason(wire.decode_envelope, SIGN1, len(SIGN1) - 1) == "oversized"


@pytest.mark.parametrize("cut", [0, 1, 2, 5, 20, 60, len(SIGN1) // 2, len(SIGN1) - 1])
def test_truncated_sign1_is_malformed(cut):
    assert _reason(wire.decode_envelope, SIGN1[:cut]) == "malformed"


def test_trailing_bytes_are_malformed():
    assert _reason(wire.decode_envelope, SIGN1 + b"\x00") == "malformed"


@pytest.mark.parametrize("data", [
    b"\xff\xfe\xfd",                                          # not CBOR
    cbor2.dumps([1, 2, 3, 4]),                                # no tag
    _sign1(tag=98),                                           # COSE_Sign (multi-signer)
    _sign1(tag=17),                                           # alg -7 under a Mac0 tag
    _sign1(protected=cbor2.dumps({1: -35})),                  # ES384
    _sign1(protected=b""),                                    # no alg at all
    _sign1(protected=b"\xa1\x01"),                            # protected not CBOR
    _sign1(unprotected={}),                                   # no kid
    _sign1(unprotected={4: "cn-x"}),                          # kid as text
    _sign1(unprotected={4: b"\xff\xfe"}),                     # kid not UTF-8
    _sign1(sig=b"\x00" * 63),                                 # short signature
    _sign1(payload="text"),                                   # payload not bstr
    cbor2.dumps(cbor2.CBORTag(18, [PROT_ES256, {}, PAYLOAD])),  # 3 elements
], ids=["garbage", "untagged", "tag98", "alg-tag-mismatch", "es384", "no-alg",
        "protected-not-cbor", "no-kid", "kid-text", "kid-not-utf8", "short-sig",
        "payload-text", "array-of-3"])
def test_malformed_envelopes(data):
    assert _reason(wire.decode_envelope, data) == "malformed"


def _mac0(protected=wire.PROTECTED[wire.ALG_HMAC256], unprotected=None):
    unprotected = {4: DEVICE.encode()} if unprotected is None else unprotected
    return cbor2.dumps(cbor2.CBORTag(17, [protected, unprotected, PAYLOAD, bytes(32)]))


KID = DEVICE.encode()
HIGH_S = bytes(31) + b"\x01" + (wire.HALF_N + 1).to_bytes(32, "big")


@pytest.mark.parametrize("data, what", [
    (_sign1(protected=b"\xa1\x01\x38\x06"), "not the canonical"),     # -7 in 2 bytes
    (_sign1(protected=b"\xbf\x01\x26\xff"), "not the canonical"),     # indefinite map
    (_sign1(protected=cbor2.dumps({1: -7, 4: KID})), "not the canonical"),  # a second key
    (_mac0(protected=b"\xa1\x01\x18\x05"), "not the canonical"),      # 5 in 2 bytes
    (_mac0(protected=cbor2.dumps({1: 5, 3: 0})), "not the canonical"),
    (_sign1(unprotected={4: KID, 1: -7}), "only the kid"),
    (_sign1(unprotected={4: KID, -65537: bytes(1000)}), "only the kid"),  # padding
    (_sign1(unprotected={4.0: KID}), "only the kid"),                    # label as a float
    (_mac0(unprotected={4: KID, 5: bytes(12)}), "only the kid"),
    (_sign1(unprotected={4: DEVICE.encode() + b"0"}), "at most 15 bytes"),
    (_sign1(unprotected={4: b"x" * 1000}), "at most 15 bytes"),
    (_sign1(sig=HIGH_S), "high s"),
    (_sign1(sig=bytes(32) + b"\xff" * 32), "high s"),                   # s >= n too
], ids=["es256-alg-2-bytes", "es256-indefinite", "es256-second-key", "hmac-alg-2-bytes",
        "hmac-second-key", "unprotected-alg", "unprotected-padding", "unprotected-float-label",
        "mac0-unprotected-iv", "kid-16-bytes", "kid-1000-bytes", "high-s", "s-all-ones"])
def test_non_canonical_envelopes_are_malformed(data, what):
    with pytest.raises(EnvelopeError) as err:
        wire.decode_envelope(data)
    assert err.value.reason == "malformed" and what in str(err.value)


def test_the_canonical_limits_themselves_are_accepted():
    assert wire.decode_envelope(_sign1(sig=bytes(31) + b"\x01" + wire.HALF_N.to_bytes(32, "big")))
    longest = "cn-ffffffffffff"                 # a device id is the longest kid
    assert wire.decode_envelope(_sign1(unprotected={4: longest.encode()})).kid == longest
    assert wire.decode_envelope(_sign1(unprotected={4: b"operator"})).kid == wire.OPERATOR_KID
    assert wire.decode_envelope(_mac0()).is_hmac


SIG = SIGN1[-64:]


@pytest.mark.parametrize("short, longer", [
    (b"\xd2\x84", b"\xd8\x12\x84"),                 # tag 18 in two bytes
    (b"\xd2\x84", b"\xd2\x98\x04"),                 # array length in two bytes
    (b"\xa1\x04\x4f", b"\xb8\x01\x04\x4f"),         # unprotected map length
    (b"\xa1\x04\x4f", b"\xa1\x18\x04\x4f"),         # kid label 4 in two bytes
    (b"\x04\x4f", b"\x04\x58\x0f"),                 # kid length in two bytes
    (b"\x58\x40" + SIG, b"\x59\x00\x40" + SIG),      # signature length in three
    (b"\x58\x40" + SIG, b"\x5f\x58\x20" + SIG[:32] + b"\x58\x20" + SIG[32:] + b"\xff"),
], ids=["tag", "array", "map", "label", "kid-length", "signature-length",
        "signature-indefinite"])
def test_an_envelope_not_in_shortest_form_is_malformed(short, longer):
    # the same content in other bytes: not signed, so anyone could make these
    data = SIGN1.replace(short, longer, 1)
    assert data != SIGN1 and cbor2.loads(data).value == cbor2.loads(SIGN1).value
    with pytest.raises(EnvelopeError) as err:
        wire.decode_envelope(data)
    assert err.value.reason == "malformed" and "shortest form" in str(err.value)


def _genuine(data: bytes, vec: dict) -> None:
    """Verify an envelope's signature as it stands, without the canonical checks."""
    protected, unprotected, payload, sig = cbor2.loads(data).value
    alg = wire.ALG_HMAC256 if vec["signer"] == "hmac" else wire.ALG_ES256
    env = wire.Envelope(alg, DEVICE, protected, payload, sig)
    if vec["signer"] == "hmac":
        wire.verify_hmac(env, SECRET)
    else:
        wire.verify_es256(env, NODE_PUB)


@pytest.mark.parametrize("vec", VECTORS["noncanonical"], ids=lambda v: v["name"])
def test_noncanonical_vectors_are_genuine_yet_refused(vec):
    data = bytes.fromhex(vec["envelope"])
    _genuine(data, vec)             # signed with the node's key: only the form is wrong
    assert _reason(wire.decode_envelope, data) == vec["reason"]
    assert _reason(wire.open_envelope, data, lambda kid, alg: NODE_PUB) == vec["reason"]


@pytest.mark.parametrize("offset", [-1, -40, -64])
def test_flipped_signature_byte_is_bad_signature(offset):
    data = bytearray(SIGN1)
    data[offset] ^= 0x01
    env = wire.decode_envelope(bytes(data))
    assert _reason(wire.verify_es256, env, NODE_PUB) == "bad_signature"


def test_flipped_payload_byte_is_bad_signature():
    data = bytearray(SIGN1)
    data[SIGN1.index(b"light/lux")] ^= 0x20   # 'l' -> 'L'
    env = wire.decode_envelope(bytes(data))
    assert _reason(wire.verify_es256, env, NODE_PUB) == "bad_signature"
    data = bytearray(MAC0)
    data[MAC0.index(b"light/lux")] ^= 0x20
    assert _reason(wire.verify_hmac, wire.decode_envelope(bytes(data)), SECRET) == "bad_signature"


def test_forgery_with_another_key_is_bad_signature():
    # a stolen gateway holds no node key: a valid-looking envelope under its own key fails
    intruder = ec.generate_private_key(ec.SECP256R1())
    env = wire.decode_envelope(wire.sign_es256(PAYLOAD, DEVICE, intruder))
    assert _reason(wire.verify_es256, env, NODE_PUB) == "bad_signature"


def _payload_env(body: dict, kid: str = DEVICE) -> wire.Envelope:
    return wire.Envelope(wire.ALG_ES256, kid, PROT_ES256, cbor2.dumps(body), b"\x00" * 64)


GOOD_BODY = {0: 2, 1: DEVICE, 2: 5, 3: 1, 5: 1000, 6: 0, 7: []}


@pytest.mark.parametrize("change", [
    {1: "cn-000000000000"},          # device differs from kid
    {2: -1}, {2: True}, {2: "5"},    # bad seq
    {5: None}, {3: -2}, {6: 1.5},    # bad or missing required uints
    {4: -5}, {4: "today"},           # bad time
    {7: {"n": 1}},                   # records not an array
    {0: 3}, {0: "2"},                # a version this gateway cannot read
], ids=["device-kid", "seq-neg", "seq-bool", "seq-text", "no-uptime", "boot-neg", "kind-float",
        "time-neg", "time-text", "records-map", "version-3", "version-text"])
def test_malformed_payloads(change):
    body = dict(GOOD_BODY)
    for key, value in change.items():
        if value is None:
            del body[key]
        else:
            body[key] = value
    assert _reason(wire.decode_payload, _payload_env(body)) == "malformed"


def test_payload_not_cbor_or_with_trailing_bytes():
    env = _payload_env(GOOD_BODY)
    trailing = wire.Envelope(env.alg, env.kid, env.protected, env.payload + b"\x00", env.signature)
    assert _reason(wire.decode_payload, trailing) == "malformed"
    cut = wire.Envelope(env.alg, env.kid, env.protected, env.payload[:-3], env.signature)
    assert _reason(wire.decode_payload, cut) == "malformed"
    assert wire.decode_payload(env).time_ms is None


def test_a_version_1_payload_reads_its_seconds_as_milliseconds():
    # nodes still on firmware before wire version 2: no key 0, time in Unix seconds
    old = {k: v for k, v in GOOD_BODY.items() if k != 0} | {4: 1_763_900_000}
    body = wire.decode_payload(_payload_env(old))
    assert (body.version, body.time_ms) == (1, 1_763_900_000_000)
    new = wire.decode_payload(_payload_env(GOOD_BODY | {4: 1_763_900_000_125}))
    assert (new.version, new.time_ms) == (2, 1_763_900_000_125)

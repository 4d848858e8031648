"""Signed updates on the node (firmware/node/ota.py, firmware/main.py's slot choice) with
bundles built as the operator builds them (ops/bundle.py), on the MicroPython unix port.

The slots are folders in the test's directory (ota.ROOT); the bundle's .mpy files are
compiled for this VM, so the updated app is imported from its slot as at a boot.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from citynode.ops import bundle
from citynode.ops.home import OpsError
from citynode.provisioning.deploy import board_mpy
from citynode.testing.emulator import FIRMWARE, vm_mpy
from citynode.testing.micropython import run_micropython_json

OPERATOR = ec.generate_private_key(ec.SECP256R1())
BOARD = "esp32-wrover-kit"


def _sec1(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)


def _bundle(tmp: Path, version: str = "9.0.0", key=OPERATOR, arch: str | None = None,
            boards: tuple[str, ...] = (BOARD,), downgrade: bool = False) -> bytes:
    """The firmware tree with another VERSION, bundled for this VM's .mpy."""
    fw = tmp / f"fw-{version}"
    if not fw.exists():
        shutil.copytree(FIRMWARE, fw, ignore=shutil.ignore_patterns("__pycache__"))
        text = (fw / "node" / "version.py").read_text()
        (fw / "node" / "version.py").write_text(
            text.replace('VERSION = "0.1.0"', f'VERSION = "{version}"'))
    ver, sub, here = board_mpy(vm_mpy())
    return bundle.build(fw, list(boards), arch or here, key, (ver, sub), downgrade=downgrade)


NODE = """
import asyncio, json, os, sys
os.chdir(%(root)r)
from node import ota
ota.ROOT = %(root)r
operator = bytes.fromhex(%(operator)r)
def update(signed, blob, chunk=700, stop=None, board=%(board)r):
    u = ota.Update(operator, board=board)
    try:
        asyncio.run(u.begin(signed))
        at = u.offset()
        while at < len(blob) and (stop is None or at < stop):
            at = u.write(at, blob[at:at + chunk])
        return u, at
    except ota.UpdateRefused as exc:
        return exc.reason, exc
"""


def _node(tmp: Path, code: str, signed: bytes, blob: bytes, **names) -> object:
    (tmp / "signed.bin").write_bytes(signed)
    (tmp / "blob.bin").write_bytes(blob)
    root = tmp / "node"
    root.mkdir(exist_ok=True)
    head = NODE % {"root": str(root), "operator": _sec1(OPERATOR).hex(), "board": BOARD}
    head += (f"signed = open({str(tmp / 'signed.bin')!r}, 'rb').read()\n"
             f"blob = open({str(tmp / 'blob.bin')!r}, 'rb').read()\n")
    for name, value in names.items():
        head += f"{name} = {value!r}\n"
    return run_micropython_json(head + code, heap_kb=512)


def _boot(tmp: Path) -> dict:
    """A boot: main.py's slot choice, then the app's version as imported from that slot."""
    root = tmp / "node"
    return run_micropython_json(f"""
import json, sys
import main
slot = main.app_slot({str(root) + "/data/ota.json"!r})
if slot:
    sys.path.insert(0, slot)
from node import version
print(json.dumps({{"slot": slot, "version": version.VERSION,
                  "state": json.load(open({str(root) + "/data/ota.json"!r}))}}))
""", heap_kb=512)


def test_an_update_is_tried_at_the_next_boot_and_kept_once_committed(tmp_path):
    signed, blob = bundle.split(_bundle(tmp_path))
    out = _node(tmp_path, """
u, at = update(signed, blob)
print(json.dumps([at, u.finish(), ota.state()["state"]]))
""", signed, blob)
    assert out == [len(blob), "9.0.0", "trial"]
    first = _boot(tmp_path)
    assert first["version"] == "9.0.0" and first["slot"].endswith("/app_a")
    assert first["state"]["boots"] == 1
    # the app commits once it has run and reached the city (node/app.py)
    committed = run_micropython_json(f"""
import json, sys
sys.path.insert(0, {first["slot"]!r})
from node import ota
ota.ROOT = {str(tmp_path / "node")!r}
print(json.dumps([ota.on_trial(), ota.commit(), ota.on_trial()]))
""", heap_kb=512)
    assert committed == [True, "9.0.0", False]
    again = _boot(tmp_path)
    assert again["version"] == "9.0.0" and again["state"]["state"] == "ok"


def test_a_boot_that_ends_before_the_commit_goes_back_to_the_app_before(tmp_path):
    """A crash, a watchdog bite or a power cut in the trial boot: the next boot runs the
    provisioned app and the state says which version failed."""
    signed, blob = bundle.split(_bundle(tmp_path))
    _node(tmp_path, "u, at = update(signed, blob); u.finish(); print(json.dumps(at))",
          signed, blob)
    assert _boot(tmp_path)["version"] == "9.0.0"       # on trial, never committed
    back = _boot(tmp_path)
    assert back["slot"] is None and back["version"] == "0.1.0"
    assert back["state"]["state"] == "reverted" and back["state"]["failed"] == "9.0.0"
    assert back["state"]["why"].startswith("its trial boot ended in ")
    assert _boot(tmp_path)["version"] == "0.1.0"       # and it stays there


def test_an_update_that_fails_its_self_test_goes_back_and_says_why(tmp_path):
    """The app's self-test (node/app.py) leaves the update; the app before reports the
    reason once. A sensor failing already when the update came is not held against it."""
    signed, blob = bundle.split(_bundle(tmp_path))
    _node(tmp_path, "u, at = update(signed, blob); list(u.finish_steps(['air'])); "
          "print(json.dumps(at))", signed, blob)
    trial = _boot(tmp_path)
    assert trial["version"] == "9.0.0" and trial["state"]["faults"] == ["air"]
    told = run_micropython_json(f"""
import json, sys
sys.path.insert(0, {trial["slot"]!r})
from node import ota
ota.ROOT = {str(tmp_path / "node")!r}
ota.fail("self-test: light failed")
print(json.dumps(ota.trial_faults()))
""", heap_kb=512)
    assert told == ["air"]
    back = _boot(tmp_path)
    assert back["version"] == "0.1.0" and back["state"]["why"] == "self-test: light failed"
    reports = run_micropython_json(f"""
import json
from node import ota
ota.ROOT = {str(tmp_path / "node")!r}
print(json.dumps([ota.take_reverted(), ota.take_reverted()]))
""", heap_kb=512)
    assert reports == [["9.0.0", "self-test: light failed"], None]
    # the same build is not tried there again (an operator's retry, a rollout resumed)
    again = _node(tmp_path, "r = update(signed, blob); print(json.dumps([r[0], str(r[1])]))",
                  signed, blob)
    assert again[0] == "failed_trial" and "self-test: light failed" in again[1], again


def test_a_download_cut_off_resumes_where_the_flash_stopped(tmp_path):
    signed, blob = bundle.split(_bundle(tmp_path))
    half = len(blob) // 2
    out = _node(tmp_path, """
u, at = update(signed, blob, stop=half)
print(json.dumps(at))
""", signed, blob, half=half)
    assert half <= out < half + 700
    # a new boot (the power came back): the same manifest, the download goes on
    out = _node(tmp_path, """
u = ota.Update(operator, board=BOARD)
asyncio.run(u.begin(signed))
resumed = u.offset()
at = resumed
while at < len(blob):
    at = u.write(at, blob[at:at + 700])
print(json.dumps([resumed, u.finish()]))
""", signed, blob, BOARD=BOARD)
    assert out[0] >= half and out[1] == "9.0.0"
    assert _boot(tmp_path)["version"] == "9.0.0"


def test_a_corrupted_chunk_is_caught_and_its_file_fetched_again(tmp_path):
    signed, blob = bundle.split(_bundle(tmp_path))
    bad = bytearray(blob)
    bad[len(blob) // 3] ^= 0x40
    (tmp_path / "bad.bin").write_bytes(bad)
    out = _node(tmp_path, """
u, at = update(signed, open(bad, "rb").read())
try:
    u.finish()
    print(json.dumps("finished"))
except ota.UpdateRefused as exc:
    resumed = again = u.offset()
    while again < len(blob):
        again = u.write(again, blob[again:again + 700])
    print(json.dumps([exc.reason, resumed, u.finish(), ota.state()]))
""", signed, blob, bad=str(tmp_path / "bad.bin"))
    # from the start of the file the bad byte was in, which is before it
    assert out[0] == "bad_file" and 0 < out[1] <= len(blob) // 3 and out[2] == "9.0.0"
    assert out[3]["state"] == "trial"


@pytest.mark.parametrize("case,reason", [
    ("another operator", "bad_signature"),
    ("another board", "wrong_board"),
    ("another chip", "wrong_board"),
    ("the same version", "not_newer"),
    ("an older version", "not_newer"),
    ("a tampered manifest", "bad_signature"),
])
def test_a_bundle_not_for_this_node_is_refused_before_anything_is_written(tmp_path, case,
                                                                           reason):
    made = {"another operator": lambda: _bundle(tmp_path, key=ec.generate_private_key(
                ec.SECP256R1())),
            "another board": lambda: _bundle(tmp_path, boards=("esp32-s3-devkitc",)),
            "another chip": lambda: _bundle(tmp_path, arch="xtensawin"),
            "the same version": lambda: _bundle(tmp_path, version="0.1.0"),
            "an older version": lambda: _bundle(tmp_path, version="0.0.9"),
            "a tampered manifest": lambda: _bundle(tmp_path)}[case]()
    signed, blob = bundle.split(made)
    if case == "a tampered manifest":
        signed = signed.replace(b"9.0.0", b"9.9.9")
    out = _node(tmp_path, """
result = update(signed, blob)
print(json.dumps([result[0], str(result[1]), sorted(os.listdir("."))]))
""", signed, blob)
    assert out[0] == reason, out
    assert out[2] == []                         # nothing written, not even a folder


def test_a_downgrade_goes_only_when_the_operator_signed_it_as_one(tmp_path):
    signed, blob = bundle.split(_bundle(tmp_path, version="0.0.9", downgrade=True))
    out = _node(tmp_path, "u, at = update(signed, blob); print(json.dumps(u.finish()))",
                signed, blob)
    assert out == "0.0.9"


def test_a_full_flash_refuses_the_update_up_front(tmp_path):
    """The test's filesystem never fills: os.statvfs is faked to say 4 KB are free."""
    signed, blob = bundle.split(_bundle(tmp_path))
    out = _node(tmp_path, """
class Flash:
    statvfs = staticmethod(lambda path: (4096, 4096, 100, 1, 1, 0, 0, 0, 0, 255))
    def __getattr__(self, name):
        return getattr(os, name)
ota.os = Flash()
result = update(signed, blob)
print(json.dumps([result[0], sorted(os.listdir("."))]))
""", signed, blob)
    assert out == ["no_room", []]


def test_the_operator_side_checks_a_bundle_as_the_node_will(tmp_path):
    data = _bundle(tmp_path)
    manifest, blob = bundle.read(data, OPERATOR.public_key())
    assert manifest.version == "9.0.0" and manifest.size == len(blob)
    assert all(not path.endswith("main.py") for path, _, _ in manifest.files)
    signed, blob = bundle.split(data)
    import cbor2
    tampered = cbor2.dumps([signed, blob[:-1] + bytes([blob[-1] ^ 1])])
    with pytest.raises(OpsError, match="does not match its manifest"):
        bundle.read(tampered, OPERATOR.public_key())
    with pytest.raises(OpsError, match="does not check out"):
        bundle.read(data, ec.generate_private_key(ec.SECP256R1()).public_key())

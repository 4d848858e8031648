"""Provisioning receipts: what was put on a board, attested by the board itself.

The node computes the deployed files' hash and reads its own MAC, adds the host's
claims (image hash, technician, time), and signs the whole with its new key
(COSE_Sign1, kid = device id). The receipt lives beside the registry entry, in
<registry>/receipts/ - a sub-folder, so the gateway's `*.json` scan never sees it -
and anyone holding the registry can check it with citynode/wire.py.
"""

from __future__ import annotations

import getpass
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from citynode import registry as reg
from citynode import wire
from citynode.files import write_atomic

from .device import Session
from .errors import RegistryWriteError, VerifyError


def technician() -> str:
    return os.environ.get("CITYNODE_TECHNICIAN") or getpass.getuser()


@dataclass
class Receipt:
    claims: dict[str, Any]
    envelope: str
    path: Path | None = None


def sign_on_node(session: Session, files: list[str], claims: dict[str, Any]) -> Receipt:
    session.fresh()
    out = session.run("file_hash", "sign_receipt", paths=sorted(files), claims=claims,
                      timeout=60, what="signing the receipt")
    return Receipt(claims, out["envelope"])


def check(receipt: Receipt, registry_dir: Path) -> dict[str, Any]:
    """Verify the node's signature with the registry key; returns the signed claims."""
    try:
        envelope = wire.decode_envelope(bytes.fromhex(receipt.envelope))
        wire.verify(envelope, reg.load_device(registry_dir, envelope.kid).key_for(envelope.kid,
                                                                                "ES256"))
        signed = json.loads(envelope.payload)
    except (ValueError, reg.RegistryError) as exc:
        raise VerifyError(f"the receipt does not verify ({exc})",
                          "re-run provision; the node key may have changed") from None
    return signed


def save(receipt: Receipt, registry_dir: Path, signed: dict[str, Any]) -> Path:
    folder = Path(registry_dir) / "receipts"
    stamp = signed.get("time", reg.now_iso()).replace(":", "").replace("-", "")
    target = folder / f"{signed['device']}-{stamp}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(target, json.dumps({"receipt": signed, "envelope": receipt.envelope},
                                        indent=2, sort_keys=True) + "\n", 0o600)
    except OSError as exc:
        raise RegistryWriteError(f"cannot write the receipt in {folder} ({exc.strerror})",
                                 "fix the registry's permissions and re-run") from None
    receipt.path = target
    return target

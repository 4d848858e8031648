"""Prove a node works: its self-test envelope must verify against the registry's key.

The self-test (firmware/node/selftest.py) samples each sensor once and signs a
payload on the node; verifying it here with citynode/wire.py - the gateway's own
decoder - shows that the key in the registry is the key on the node, end to end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from citynode import registry as reg
from citynode import wire

from .device import Session
from .errors import VerifyError
from .keys import fingerprint


@dataclass
class VerifyResult:
    device: str
    firmware: str
    micropython: str
    seq: int
    sensors: dict[str, Any]
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "firmware": self.firmware,
                "micropython": self.micropython, "seq": self.seq, "sensors": self.sensors,
                "key_fingerprint": self.fingerprint, "verified": True}


def _verify_error(device: str, exc: ValueError) -> VerifyError:
    """What a technician does about a self-test envelope that does not open."""
    reason = getattr(exc, "reason", "malformed")
    if reason == "key_unavailable":
        return VerifyError(f"{device} is not usable in the registry ({exc})",
                           "register it: citynode-provision keys --port PORT")
    if reason == "revoked":
        return VerifyError(f"{device} is revoked in the registry",
                           "rotate its key (citynode-provision rotate) to bring it back")
    if "registered for" in str(exc):
        return VerifyError(f"{device} is registered for another algorithm than the self-test's "
                           f"ES256 ({exc})", "verify HMAC devices through the gateway")
    return VerifyError(f"the self-test envelope of {device} does not verify against the "
                       f"registry key ({exc})",
                       "the node's key differs from the registered one: re-run keys "
                       "(--force-rekey if the board was replaced on purpose)")


def selftest(session: Session) -> dict[str, Any]:
    session.fresh()
    return session.exec_json("import node.selftest\nnode.selftest.main()", timeout=60,
                             what="the self-test")


def verify(session: Session, registry_dir: Path, device: str | None = None) -> VerifyResult:
    report = selftest(session)
    return check_report(report, registry_dir, device)


def check_report(report: dict[str, Any], registry_dir: Path,
                 device: str | None = None) -> VerifyResult:
    got = report.get("device")
    if device is not None and got != device:
        raise VerifyError(f"the node reports device {got}, expected {device}",
                          "re-run deploy: /config.json does not match this board")
    try:
        registry = reg.load_device(registry_dir, got)
    except reg.RegistryError as exc:
        raise VerifyError(f"{got} is not usable in the registry ({exc})",
                          "register it: citynode-provision keys --port PORT") from None
    try:
        key = registry.key_for(got, "ES256")  # the self-test is always ES256-signed
        payload = wire.open_envelope(bytes.fromhex(report.get("envelope", "")), registry.key_for)
    except ValueError as exc:  # wire.EnvelopeError, or hex that is not hex
        raise _verify_error(got, exc) from None
    if payload.device != got:
        raise VerifyError(f"the envelope names {payload.device}, not {got}", "re-run deploy")
    public = key.public_bytes(serialization.Encoding.X962,
                              serialization.PublicFormat.UncompressedPoint)
    return VerifyResult(device=got, firmware=str(report.get("firmware")),
                        micropython=str(report.get("micropython")), seq=payload.seq,
                        sensors=report.get("sensors") or {}, fingerprint=fingerprint(public))

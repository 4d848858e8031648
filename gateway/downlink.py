"""Downlink: operator commands from the city's broker, relayed to the node.

`<prefix>/<gateway>/down/<device>` is relayed to the node (`citynode/down/<device>` on
the pole's broker, bytes untouched) only when it is a COSE_Sign1 that verifies against
the operator's public key and names that device. Without `gateway.operator_key` the
gateway has no relay and does not subscribe to downlinks at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from citynode import wire

from .config import ConfigError
from .logs import RateLimitedLog
from .metrics import Metrics

log = logging.getLogger("citynode.gateway.downlink")


def load_operator_key(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"gateway.operator_key {path}: not a readable PEM public key "
                          f"({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ConfigError(f"gateway.operator_key {path}: must be a P-256 public key")
    return key


class DownlinkRelay:
    """Check a command from the city and publish it to its node through `publish`
    (the pole link's: topic, bytes -> whether the pole's broker could take it)."""

    def __init__(self, operator_key: ec.EllipticCurvePublicKey,
                 publish: Callable[[str, bytes], bool], metrics: Metrics):
        self.operator_key = operator_key
        self.publish = publish
        self.metrics = metrics
        self.rlog = RateLimitedLog(log)

    def handle(self, device: str, data: bytes) -> None:
        """One command for `device`: relayed or refused, counted by result either way."""
        try:
            wire.open_command(data, self.operator_key, device)
        except wire.EnvelopeError as exc:
            self.metrics.inc("downlink_total", result=exc.reason)
            self.rlog.warning("down-" + exc.reason, "downlink for %r refused: %s", device, exc)
            return
        ok = self.publish(wire.down_topic(device), data)
        self.metrics.inc("downlink_total", result="relayed" if ok else "local_down")

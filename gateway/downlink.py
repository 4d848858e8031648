"""Downlink: operator commands from the city's broker, relayed to the node.

`<prefix>/<gateway>/down/<device>` is relayed to the node (`citynode/down/<device>` on
the pole's broker, bytes untouched) only when it is a COSE_Sign1 that verifies against
the operator's public key and names that device, and only at a pace the node can take:
checking a command's signature holds a node's event loop for a second or more at chip
speed, so a burst of BURST commands per node passes, then one every REFILL_S (a script
gone wrong, or a stolen operator key, cannot keep a node from its sensors). A command
issued more than MAX_AGE_S ago (its time, key 4: the city's broker kept it while the
pole was offline) or more than MAX_AHEAD_S ahead of the pole's clock is refused as
`expired`: yesterday's "lamp 100" must not light a street today. An update's chunks
(commands named ota_*, docs/ota.md) have their own quota, for the whole pole: OTA_BURST
at once, then OTA_PER_S, so a rollout neither waits on the command pace nor takes the
pole's link from the readings. Without
`gateway.operator_key` the gateway has no relay and does not subscribe to downlinks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from citynode import wire

from .buckets import Buckets
from .config import ConfigError
from .logs import RateLimitedLog
from .metrics import Metrics

log = logging.getLogger("citynode.gateway.downlink")

BURST = 3          # commands a node may get at once
REFILL_S = 5.0     # then one more per this many seconds
OTA_BURST = 8      # update commands (ota_*) the pole's nodes may get at once, all together
OTA_PER_S = 4.0    # then this many per second: ~8 KB/s of a bundle for the whole pole
MAX_AGE_S = 600    # a command older than this is not carried out
MAX_AHEAD_S = 60   # the operator's clock may be this far ahead of the pole's (NTP on both)


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
                 publish: Callable[[str, bytes], bool], metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.operator_key = operator_key
        self.publish = publish
        self.metrics = metrics
        self.clock = clock
        self.wall_clock = wall_clock
        self.rlog = RateLimitedLog(log)
        self.buckets = Buckets(BURST, 1 / REFILL_S, clock)
        self.ota = Buckets(OTA_BURST, OTA_PER_S, clock)

    def handle(self, device: str, data: bytes) -> None:
        """One command for `device`: relayed or refused, counted by result either way."""
        try:
            command = wire.open_command(data, self.operator_key, device)
        except wire.EnvelopeError as exc:
            self.metrics.inc("downlink_total", result=exc.reason)
            self.rlog.warning("down-" + exc.reason, "downlink for %r refused: %s", device, exc)
            return
        age = self.wall_clock() - command.time
        if not -MAX_AHEAD_S <= age <= MAX_AGE_S:
            self.metrics.inc("downlink_total", result="expired")
            self.rlog.warning("down-expired", "downlink for %s refused: issued %.0f s %s, "
                              "more than %d s; send it again (or check the sender's clock)",
                              device, abs(age), "ago" if age > 0 else "ahead of this pole",
                              MAX_AGE_S if age > 0 else MAX_AHEAD_S)
            return
        if command.expires is not None and self.wall_clock() > command.expires:
            self.metrics.inc("downlink_total", result="expired")
            self.rlog.warning("down-expired", "downlink for %s refused: it expired %.0f s ago "
                              "(its own deadline); send it again", device,
                              self.wall_clock() - command.expires)
            return
        if command.name.startswith("ota_"):
            if not self.ota.take("pole"):
                self.metrics.inc("downlink_total", result="rate_limited")
                self.rlog.warning("down-ota-rate", "update chunk for %s refused: the pole "
                                  "takes %d at once, then %g per second", device, OTA_BURST,
                                  OTA_PER_S)
                return
        elif not self.buckets.take(device):
            self.metrics.inc("downlink_total", result="rate_limited")
            self.rlog.warning("down-rate", "downlink for %s refused: more than %d commands, "
                              "then one per %g s; send it again later", device, BURST, REFILL_S)
            return
        ok = self.publish(wire.down_topic(device), data)
        self.metrics.inc("downlink_total", result="relayed" if ok else "local_down")

"""The node's keys: an ES256 key born on the node, an optional HMAC secret, the operator's public key.

The private key is made only when asked (create(), by citynode-provision; next_key(),
by a rollover), never implicitly at boot, and only while the radio is on: per
Espressif the ESP32's RNG (os.urandom) is truly random only while Wi-Fi or Bluetooth
runs. It is kept in `<base>/node.key` as 32 raw bytes and is never returned, printed
or logged: callers get the public key, and sign through NodeKeys.sign or the app's
node.signer.Signer (the one borrower of the key). A key file that exists but is
damaged raises instead of being replaced, because a new key would silently change the
node's identity.

A key is replaced in two phases, so that no envelope is ever signed with a key the
registry does not know: next_key() makes the next key (`node.next`) and gives its public
key while the node goes on signing with the current one; once the registry accepts the
next key (citynode-provision rollover), commit_next() makes it the node key.
"""

import os

from node import p256
from node.fsutil import join, makedirs, read, write_atomic
from node.hmac256 import hmac_sha256

NODE_KEY = "node.key"
NEXT_KEY = "node.next"
HMAC_KEY = "hmac.key"
OPERATOR_KEY = "operator.pub"


class NoKey(ValueError):
    """The node has no key yet: provisioning makes it (keys are never made implicitly)."""


class RadioOff(ValueError):
    """A key asked for while the radio is off, when the RNG is only pseudo-random."""


def radio_on():
    """Whether os.urandom is truly random now: on the ESP32 only with Wi-Fi on. A port
    without a radio (the unix port of the host's tests) has no such condition."""
    try:
        import network
    except ImportError:
        return True
    for interface in (network.STA_IF, network.AP_IF):
        try:
            if network.WLAN(interface).active():
                return True
        except (OSError, ValueError):
            pass
    return False


class NodeKeys:
    """Key store rooted at `base` (default /secret); see the module doc."""

    def __init__(self, base="/secret"):
        self.base = base
        self._priv = None
        self._pub = None
        self._secret = None

    def __repr__(self):
        return "<NodeKeys %s>" % self.base

    def _path(self, name):
        return join(self.base, name)

    def _private(self):
        if self._priv is None:
            raw = read(self._path(NODE_KEY))
            if raw is None:
                raise NoKey("no node key: provision this node (citynode-provision keys)")
            p256.check_private(raw)  # raises ValueError if damaged
            self._priv = raw
        return self._priv

    def _new_key(self, name):
        if not radio_on():
            raise RadioOff("the radio is off, so the RNG is not random: switch the WLAN on "
                           "(network.WLAN(network.STA_IF).active(True)) before making a key")
        makedirs(self.base)
        raw = p256.new_private_key()
        write_atomic(self._path(name), raw)
        return raw

    def has_key(self):
        """True once the node key exists (without creating it)."""
        return self._priv is not None or read(self._path(NODE_KEY)) is not None

    def check(self):
        """NoKey if the node has no key, ValueError if its key file is damaged."""
        self._private()

    def create(self):
        """Make the node key if it has none (RadioOff with the radio off); its public key."""
        if not self.has_key():
            self._priv = self._new_key(NODE_KEY)
            self._pub = None
        return self.public_key()

    def public_key(self):
        """The node's public key, SEC1 uncompressed (65 bytes); NoKey before create()."""
        return p256.finish(self.public_key_steps())

    def public_key_steps(self):
        """public_key() as a generator of steps (node.signer runs it in the event loop)."""
        if self._pub is None:
            self._pub = yield from p256.public_key_steps(self._private())
        return self._pub

    def public_key_hex(self):
        return self.public_key().hex()

    def sign(self, msg):
        """ES256 signature r || s of `msg` with the node key."""
        return p256.sign(self._private(), msg)

    # --- rollover: the next key, then the switch ----------------------------------

    def next_key(self):
        """The next key's public key, made the first time (phase one of a rollover)."""
        return p256.finish(self.next_key_steps())

    def next_key_steps(self):
        """next_key() as a generator of steps. The same next key until commit_next(): a
        rollover asked twice (a lost answer, a re-run) names one key."""
        raw = read(self._path(NEXT_KEY))
        if raw is not None:
            p256.check_private(raw)
        if raw is None or raw == self._private():   # a cut after the switch left a copy
            raw = self._new_key(NEXT_KEY)
        return (yield from p256.public_key_steps(raw))

    def commit_next(self):
        """Sign with the next key from now on (phase two); NoKey if there is none."""
        raw = read(self._path(NEXT_KEY))
        if raw is None:
            raise NoKey("no next key to switch to: ask for one first (rotate_key)")
        p256.check_private(raw)
        if raw != self._private():
            write_atomic(self._path(NODE_KEY), raw)
        os.remove(self._path(NEXT_KEY))     # a cut before this: the switch is done anyway
        self._priv = raw
        self._pub = None

    # --- HMAC secret (low-power COSE_Mac0 option) -----------------------------

    def set_hmac_secret(self, secret):
        if len(secret) < 16:
            raise ValueError("HMAC secret must be at least 16 bytes")
        makedirs(self.base)
        write_atomic(self._path(HMAC_KEY), bytes(secret))
        self._secret = bytes(secret)

    def has_hmac_secret(self):
        return read(self._path(HMAC_KEY)) is not None

    def mac(self, msg):
        """HMAC-SHA256 of `msg` under the stored secret (ValueError if none is installed)."""
        if self._secret is None:
            self._secret = read(self._path(HMAC_KEY))
            if self._secret is None:
                raise ValueError("no HMAC secret installed")
        return hmac_sha256(self._secret, msg)

    # --- operator public key (verifies downlink commands) ----------------------

    def install_operator_key(self, pub):
        """Store the operator's public key (SEC1, 65 or 33 bytes) after checking it is on P-256."""
        x, y = p256.decode_point(pub)
        makedirs(self.base)
        write_atomic(self._path(OPERATOR_KEY), b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big"))

    def operator_key(self):
        """The operator's public key (65 bytes), or None before one is installed."""
        return read(self._path(OPERATOR_KEY))

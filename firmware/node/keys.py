"""The node's keys: an ES256 key born on the node, an optional HMAC secret, the operator's public key.

The private key is generated on first use from os.urandom (the ESP32's hardware
RNG, which per Espressif is only truly random while Wi-Fi or Bluetooth is on:
activate the WLAN interface before the first public_key() call) and kept in
`<base>/node.key` as 32 raw bytes. It is never
returned, printed or logged: callers get the public key, and sign through
NodeKeys.sign. A key file that exists but is damaged raises instead of being
replaced, because a new key would silently change the node's identity.
"""

from node import p256
from node.fsutil import join, makedirs, read, write_atomic
from node.hmac256 import hmac_sha256

NODE_KEY = "node.key"
HMAC_KEY = "hmac.key"
OPERATOR_KEY = "operator.pub"


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
                return self._new_key()
            p256.check_private(raw)  # raises ValueError if damaged
            self._priv = raw
        return self._priv

    def _new_key(self):
        makedirs(self.base)
        raw = p256.new_private_key()
        write_atomic(self._path(NODE_KEY), raw)
        self._priv = raw
        self._pub = None
        return raw

    def has_key(self):
        """True once the node key exists (without creating it)."""
        return self._priv is not None or read(self._path(NODE_KEY)) is not None

    def public_key(self):
        """The node's public key, SEC1 uncompressed (65 bytes); creates the key on first use."""
        if self._pub is None:
            self._pub = p256.public_key(self._private())
        return self._pub

    def public_key_hex(self):
        return self.public_key().hex()

    def sign(self, msg):
        """ES256 signature r || s of `msg` with the node key."""
        return p256.sign(self._private(), msg)

    def rotate(self):
        """Replace the node key with a fresh one (downlink `rotate_key`); returns the new public key."""
        self._new_key()
        return self.public_key()

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

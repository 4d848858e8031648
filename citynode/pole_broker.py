"""The pole broker's accounts: one per node (its device id) and one for the gateway.

The pole's Mosquitto lets no anonymous client in (deploy/mosquitto.conf) and checks
passwords against a password file of `user:$7$...` lines, the PBKDF2-SHA512 format of
mosquitto_passwd. A node's secret is made on the technician's laptop at provisioning and
goes to the node over the USB cable only; the registry keeps its hash, which is as public
as the node's public key. The gateway host writes the broker's password file from the
registry (`citynode-gateway broker-accounts`), so a node revoked in the registry is
refused at the broker's next reload. deploy/mosquitto.acl gives each account its topics.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from citynode.files import write_atomic

GATEWAY_USER = "citynode-gateway"   # reads citynode/up/+, writes citynode/down/+
MONITOR_USER = "citynode-monitor"   # a technician's read-only view of the pole's traffic
ITERATIONS = 101   # mosquitto_passwd's default: the secrets are random, not chosen by people
SALT_BYTES = 12


class AccountError(ValueError):
    """A password file or secret that cannot be used; the message says what to fix."""


def new_secret() -> str:
    """A broker password: 192 random bits, URL-safe (no ':' or newline to escape)."""
    return secrets.token_urlsafe(24)


def hash_secret(secret: str, salt: bytes | None = None) -> str:
    """The password file's form of `secret`: $7$<iterations>$<salt>$<PBKDF2-SHA512>."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, ITERATIONS)
    salt_b64, digest_b64 = base64.b64encode(salt).decode(), base64.b64encode(digest).decode()
    return f"$7${ITERATIONS}${salt_b64}${digest_b64}"


def secret_matches(secret: str, hashed: str) -> bool:
    """Whether `secret` is the one `hashed` was made from (constant-time compare)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt, want = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", secret.encode(), salt, int(parts[2]))
    return hmac.compare_digest(got, want)


def read_secret(path: Path) -> str:
    """A secret file's first line; AccountError when missing, unreadable or empty."""
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise AccountError(f"cannot read the secret {path} ({exc.strerror}); create it with "
                           "`citynode-gateway broker-accounts --new-gateway-secret`") from None
    if not secret or "\n" in secret:
        raise AccountError(f"{path} must hold one line, the secret")
    return secret


def write_secret(path: Path, secret: str) -> None:
    """A new secret file, 0600, never over an existing one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secret + "\n")


def node_accounts(records: Iterable) -> list[tuple[str, str]]:
    """(device id, hash) of every active registry record that has a broker password;
    a revoked node has no account, so the broker refuses it after its next reload."""
    return [(r.device_id, r.broker_hash) for r in records if r.active and r.broker_hash]


def password_file_text(accounts: Iterable[tuple[str, str]]) -> str:
    """`user:hash` lines, sorted, for Mosquitto's password_file."""
    lines = []
    for user, hashed in sorted(accounts):
        if not user or ":" in user or any(c.isspace() for c in user):
            raise AccountError(f"broker user name {user!r} cannot be written to a password file")
        if not hashed.startswith("$7$"):
            raise AccountError(f"the hash for {user} is not a mosquitto $7$ hash")
        lines.append(f"{user}:{hashed}\n")
    return "".join(lines)


def write_password_file(path: Path, text: str, group: str | None = "mosquitto") -> None:
    """Replace the password file atomically, 0640; group `mosquitto` (the broker's user)
    when it exists and we may give it, so the broker can read it and nobody else can."""
    path.parent.mkdir(parents=True, exist_ok=True)
    gid = None
    if group is not None and os.geteuid() == 0:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            pass
    write_atomic(path, text, 0o640, gid)

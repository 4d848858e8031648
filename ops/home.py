"""The operator's folder: the operator key, the city broker's settings and the command
numbers sent to each device, on the operator's machine only.

    ~/.config/citynode-ops/          ($CITYNODE_OPS_HOME or --home to put it elsewhere)
        operator.key.pem             the private key (0600): signs every command
        operator.pub.pem             its public half: give it to provisioning (--operator-key)
                                     and to every gateway (gateway.operator_key)
        ops.toml                     the city broker and the registry (citynode-ops init)
        seq.json                     per device, the last command number sent (0600)

A node accepts a command only with a number above the last it accepted, so the numbers
live here, updated under a lock before a command leaves (two operators' shells at once
never send the same number) and raised when a node says it has seen a higher one.
"""

from __future__ import annotations

import fcntl
import json
import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from citynode.cli import EXIT_USAGE, CliError
from citynode.files import write_atomic

KEY_FILE, PUBLIC_FILE, CONFIG_FILE, SEQ_FILE = (
    "operator.key.pem", "operator.pub.pem", "ops.toml", "seq.json")


class OpsError(CliError):
    """A setting, a key or a file the operator has to fix."""

    exit_code = EXIT_USAGE
    kind = "usage"


def default_home() -> Path:
    if os.environ.get("CITYNODE_OPS_HOME"):
        return Path(os.environ["CITYNODE_OPS_HOME"])
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "citynode-ops"


@dataclass(frozen=True)
class CitySettings:
    """Where the city's broker is and how to log in; the gateways' topic prefix."""

    host: str
    port: int = 8883
    tls: bool = True
    ca_file: str | None = None
    username: str | None = None
    password_file: str | None = None
    topic_prefix: str = "city/citynode"
    registry_dir: str | None = None      # to verify what nodes answer (their public keys)

    def to_toml(self) -> str:
        lines = ["# citynode-ops: the city's MQTT broker, as the gateways' [upstream]", "[city]"]
        for name, value in vars(self).items():
            if value is None:
                continue
            if isinstance(value, bool):
                lines.append(f"{name} = {str(value).lower()}")
            elif isinstance(value, int):
                lines.append(f"{name} = {value}")
            else:
                lines.append(f"{name} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"


class OpsHome:
    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else default_home()

    # --- the operator key ---------------------------------------------------------------
    def create_key(self) -> Path:
        """A new P-256 operator key; never over an existing one (every node trusts it)."""
        key_path = self.path / KEY_FILE
        if key_path.exists():
            raise OpsError(f"{key_path} exists: every node provisioned with it trusts it",
                           "keep it; to start over, move it away first (nodes with the "
                           "old key then refuse new commands until re-provisioned)")
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        write_atomic(key_path, private.decode(), mode=0o600)
        write_atomic(self.path / PUBLIC_FILE, _public_pem(key.public_key()).decode(), mode=0o644)
        return self.path / PUBLIC_FILE

    def key(self) -> ec.EllipticCurvePrivateKey:
        path = self.path / KEY_FILE
        try:
            if path.stat().st_mode & 0o077:
                raise OpsError(f"{path} can be read by others", f"chmod 600 {path}")
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise OpsError(f"no operator key in {self.path}",
                           "run 'citynode-ops init' (or pass --home)") from None
        except (OSError, ValueError, TypeError) as exc:
            raise OpsError(f"cannot read the operator key {path} ({exc})",
                           "restore it from your backup") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise OpsError(f"{path} is not a P-256 key", "create one with 'citynode-ops init'")
        return key

    def public_pem(self) -> bytes:
        return _public_pem(self.key().public_key())

    # --- the city broker ----------------------------------------------------------------
    def save_settings(self, settings: CitySettings) -> Path:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(self.path / CONFIG_FILE, settings.to_toml(), mode=0o600)
        return self.path / CONFIG_FILE

    def settings(self) -> CitySettings:
        path = self.path / CONFIG_FILE
        try:
            table = tomllib.loads(path.read_text()).get("city", {})
        except FileNotFoundError:
            raise OpsError(f"no {path}", "run 'citynode-ops init --broker HOST:PORT'") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise OpsError(f"cannot read {path} ({exc})", "fix or rewrite it with "
                           "'citynode-ops init --force-config'") from None
        try:
            return CitySettings(**table)
        except TypeError as exc:
            raise OpsError(f"{path}: {exc}", "the [city] keys are those 'citynode-ops init' "
                           "writes") from None

    # --- command numbers ----------------------------------------------------------------
    @contextmanager
    def numbers(self) -> Iterator[dict[str, int]]:
        """The last number sent per device, locked while the caller changes it."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_path = self.path / (SEQ_FILE + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.path / SEQ_FILE
            try:
                numbers = json.loads(path.read_text()) if path.exists() else {}
            except (OSError, ValueError) as exc:
                raise OpsError(f"cannot read {path} ({exc})",
                               "restore it, or delete it: the next answer of each node "
                               "tells its last number and citynode-ops follows") from None
            before = dict(numbers)
            yield numbers
            if numbers != before:
                write_atomic(path, json.dumps(numbers, indent=1, sort_keys=True), mode=0o600)


def _public_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)

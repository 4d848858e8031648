"""The fleet registry: one `<device_id>.json` per device in a directory.

This module owns the format for every host program: the provisioning CLI writes
records (`write_record`, `revoke`), the gateway reads them (`load_registry`) and
reloads them on SIGHUP. A record names the device's key: an ES256 public key in
PEM (`public_key_pem`), or for HMAC devices a `key_ref`, the path of a file that
holds the shared secret in hex (relative paths are taken from the registry
directory). Secrets never appear in error messages or in `repr`.

During a key rollover (`rollover`) a record names a second ES256 key,
`rollover_public_key_pem`, accepted until `rollover_until`: the node's old key, for
what it signed before it switched, and until it switches (the node signs with the
new key only once the registry knows it: firmware node/keys.py).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_public_key,
)

from citynode import wire
from citynode.files import write_atomic

DEVICE_ID = re.compile(r"^cn-[0-9a-f]{12}$")  # wire.device_id(mac)
ALGS = ("ES256", "HMAC256")
STATUSES = ("active", "revoked")
FIELDS = ("device_id", "alg", "public_key_pem", "key_ref", "board", "site", "pole", "lat", "lon",
          "height_m", "firmware", "status", "provisioned_at", "broker_hash",
          "rollover_public_key_pem", "rollover_until")
MAX_HEIGHT_M = 100.0   # a pole's mounting height; more is a typo


class RegistryError(ValueError):
    """A registry record or directory that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class DeviceRecord:
    device_id: str
    alg: str
    board: str
    site: str
    pole: str
    lat: float
    lon: float
    firmware: str
    status: str = "active"
    provisioned_at: str = ""
    public_key_pem: str | None = None
    key_ref: str | None = None
    broker_hash: str | None = None  # the pole broker's hash of the node's password
    rollover_public_key_pem: str | None = None  # also accepted, until rollover_until
    rollover_until: str | None = None           # ISO 8601 UTC
    height_m: float | None = None   # mounting height above the ground (the node's microphone)

    @property
    def active(self) -> bool:
        return self.status == "active"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: data[k] for k in FIELDS if data[k] is not None}


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def record_from_dict(data: Any, source: str = "record") -> DeviceRecord:
    """Validate a parsed JSON object; raise RegistryError naming the field and the fix."""
    if not isinstance(data, dict):
        raise RegistryError(f"{source}: must be a JSON object")
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise RegistryError(f"{source}: unknown field(s) {', '.join(unknown)}; "
                            f"allowed: {', '.join(FIELDS)}")

    def text(name: str, required: bool = True) -> str | None:
        value = data.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value:
            raise RegistryError(f"{source}: field {name!r} must be a non-empty string")
        return value

    def number(name: str, low: float, high: float) -> float:
        value = data.get(name)
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not low <= value <= high):
            raise RegistryError(f"{source}: field {name!r} must be a number in [{low}, {high}]")
        return float(value)

    device_id = text("device_id")
    if not DEVICE_ID.match(device_id):
        raise RegistryError(f"{source}: device_id {device_id!r} must look like cn-240ac4e29526 "
                            "('cn-' + 12 lowercase hex digits of the base MAC)")
    alg = data.get("alg")
    if alg not in ALGS:
        raise RegistryError(f"{source}: field 'alg' must be one of {', '.join(ALGS)}")
    status = data.get("status", "active")
    if status not in STATUSES:
        raise RegistryError(f"{source}: field 'status' must be one of {', '.join(STATUSES)}")
    pem, key_ref = text("public_key_pem", False), text("key_ref", False)
    if alg == "ES256":
        if pem is None:
            raise RegistryError(f"{source}: ES256 devices need 'public_key_pem' (the P-256 public "
                                "key read back from the node)")
        _load_p256(pem, source)
    elif key_ref is None:
        raise RegistryError(f"{source}: HMAC256 devices need 'key_ref' (path of the secret file)")
    broker_hash = text("broker_hash", False)
    if broker_hash is not None and not broker_hash.startswith("$7$"):
        raise RegistryError(f"{source}: field 'broker_hash' must be a mosquitto $7$ hash "
                            "(re-run citynode-provision to make the node a new broker password)")
    rollover_pem, rollover_until = (text("rollover_public_key_pem", False),
                                    text("rollover_until", False))
    if rollover_pem is not None:
        if alg != "ES256":
            raise RegistryError(f"{source}: 'rollover_public_key_pem' is for ES256 devices")
        _load_p256(rollover_pem, source)
        if rollover_until is None:
            raise RegistryError(f"{source}: 'rollover_public_key_pem' needs 'rollover_until' "
                                "(when the second key stops being accepted)")
    if rollover_until is not None:
        _parse_time(rollover_until, "rollover_until", source)
    height_m = None
    if data.get("height_m") is not None:
        height_m = number("height_m", 0, MAX_HEIGHT_M)
    provisioned_at = data.get("provisioned_at", "")
    if not isinstance(provisioned_at, str):
        raise RegistryError(f"{source}: field 'provisioned_at' must be an ISO 8601 string")
    return DeviceRecord(
        device_id=device_id, alg=alg, board=text("board"), site=text("site"), pole=text("pole"),
        lat=number("lat", -90, 90), lon=number("lon", -180, 180), firmware=text("firmware"),
        status=status, provisioned_at=provisioned_at, public_key_pem=pem, key_ref=key_ref,
        broker_hash=broker_hash, rollover_public_key_pem=rollover_pem,
        rollover_until=rollover_until, height_m=height_m)


def _parse_time(text: str, name: str, source: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise RegistryError(f"{source}: field {name!r} must be an ISO 8601 time such as "
                            "2026-12-31T00:00:00Z") from None
    if when.tzinfo is None:
        raise RegistryError(f"{source}: field {name!r} needs its time zone (end it in Z)")
    return when


def _load_p256(pem: str, source: str) -> ec.EllipticCurvePublicKey:
    try:
        key = load_pem_public_key(pem.encode())
    except ValueError:
        raise RegistryError(f"{source}: 'public_key_pem' is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise RegistryError(f"{source}: 'public_key_pem' must be a P-256 (secp256r1) key")
    return key


def load_record(path: str | Path) -> DeviceRecord:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path}: not valid JSON ({exc}); fix or remove the file") from None
    record = record_from_dict(data, str(path))
    if path.stem != record.device_id:
        raise RegistryError(f"{path}: file name must be {record.device_id}.json")
    return record


@dataclass(frozen=True)
class Credential:
    """What the gateway verifies a device with: a public key, or an HMAC secret."""

    alg: str
    public_key: ec.EllipticCurvePublicKey | None = None
    secret: bytes | None = None

    @cached_property
    def key_id(self) -> str:
        """A short, stable name of the key (not of a secret: a hash of it), for replay
        windows kept per key."""
        if self.public_key is not None:
            material = _point(self.public_key)
        else:
            material = b"hmac:" + (self.secret or b"")
        return hashlib.sha256(material).hexdigest()[:16]

    def __repr__(self) -> str:  # never print a secret
        return f"Credential(alg={self.alg!r})"


class Registry:
    """The loaded registry: records by device id, plus the files that failed to load."""

    def __init__(self, directory: Path, records: dict[str, DeviceRecord], errors: list[str]):
        self.directory = directory
        self.records = records
        self.errors = errors
        self._credentials: dict[str, Credential] = {}
        self._rollover: dict[tuple[str, str], Credential] = {}

    def __len__(self) -> int:
        return len(self.records)

    def get(self, device_id: str) -> DeviceRecord | None:
        return self.records.get(device_id)

    def credential(self, record: DeviceRecord) -> Credential:
        """The verified key material of a record (cached); RegistryError if unusable."""
        cached = self._credentials.get(record.device_id)
        if cached is not None:
            return cached
        if record.alg == "ES256":
            cred = Credential("ES256", public_key=_load_p256(record.public_key_pem or "",
                                                            record.device_id))
        else:
            cred = Credential("HMAC256", secret=read_secret(self.directory, record))
        self._credentials[record.device_id] = cred
        return cred

    def _rollover_credential(self, record: DeviceRecord) -> Credential | None:
        """A rollover's second key while it is accepted (rollover_until in the future)."""
        if record.rollover_public_key_pem is None or record.rollover_until is None:
            return None
        if datetime.now(UTC) >= _parse_time(record.rollover_until, "rollover_until",
                                            record.device_id):
            return None
        key = (record.device_id, record.rollover_public_key_pem)
        cred = self._rollover.get(key)
        if cred is None:
            cred = Credential("ES256", public_key=_load_p256(record.rollover_public_key_pem,
                                                            record.device_id))
            self._rollover[key] = cred
        return cred

    def key_id(self, device_id: str) -> str:
        """The id of the key a device's envelopes verify with now ("" if none)."""
        record = self.records.get(device_id)
        try:
            return self.credential(record).key_id if record else ""
        except RegistryError:
            return ""

    def credentials_for(self, kid: str, alg: str) -> list[Credential]:
        """The keys `kid`'s envelopes may verify with: its key, then during a rollover the
        second one. EnvelopeError (with the gateway's reason) when there is none."""
        record = self.records.get(kid)
        if record is None:
            raise wire.EnvelopeError("unknown_device", f"{kid!r} is not in the fleet registry")
        if not record.active:
            raise wire.EnvelopeError("revoked", f"{kid} is revoked")
        if record.alg != alg:
            raise wire.EnvelopeError("bad_signature", f"{kid} is registered for {record.alg}, "
                                     f"the envelope uses {alg}")
        try:
            found = [self.credential(record), self._rollover_credential(record)]
        except RegistryError as exc:
            raise wire.EnvelopeError("key_unavailable", str(exc)) from None
        return [c for c in found if c is not None]

    def key_for(self, kid: str, alg: str) -> ec.EllipticCurvePublicKey | bytes:
        """The key that verifies `kid`'s envelopes (wire.KeyLookup): EnvelopeError if none."""
        credential = self.credentials_for(kid, alg)[0]
        return credential.public_key or credential.secret or b""

    def verify(self, envelope: wire.Envelope) -> str:
        """Check an envelope's signature with its device's keys; the id of the key that
        verified it (replay windows are kept per key). EnvelopeError says why not."""
        alg = "HMAC256" if envelope.is_hmac else "ES256"
        failure = None
        for credential in self.credentials_for(envelope.kid, alg):
            try:
                wire.verify(envelope, credential.public_key or credential.secret or b"")
                return credential.key_id
            except wire.EnvelopeError as exc:
                failure = exc
        assert failure is not None
        raise failure


def read_secret(directory: Path, record: DeviceRecord) -> bytes:
    ref = Path(record.key_ref or "")
    path = ref if ref.is_absolute() else directory / ref
    try:
        secret = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except OSError as exc:
        raise RegistryError(f"{record.device_id}: key_ref {path} cannot be read "
                            f"({exc.strerror})") from None
    except ValueError:
        raise RegistryError(f"{record.device_id}: key_ref {path} must hold the secret "
                            "as hex") from None
    if len(secret) < 16:
        raise RegistryError(f"{record.device_id}: key_ref {path} holds fewer than 16 bytes")
    return secret


def load_registry(directory: str | Path, strict: bool = False) -> Registry:
    """Load every `*.json` record of a directory.

    With strict=False (the gateway) a bad file is reported in `Registry.errors` and
    skipped, so one broken record never takes the fleet down; strict=True raises
    RegistryError on the first bad file (the provisioning CLI, CI checks).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise RegistryError(f"registry directory {directory} does not exist; create it or set "
                            "[gateway] registry_dir in the gateway config")
    records: dict[str, DeviceRecord] = {}
    errors: list[str] = []
    for path in sorted(directory.glob("*.json")):
        try:
            record = load_record(path)
        except RegistryError as exc:
            if strict:
                raise
            errors.append(str(exc))
            continue
        records[record.device_id] = record
    return Registry(directory, records, errors)


def load_device(directory: str | Path, device_id: str) -> Registry:
    """A registry of one device's record, for checking that device's envelopes outside the
    gateway; RegistryError when its record is missing or unusable."""
    directory = Path(directory)
    record = load_record(directory / f"{device_id}.json")
    return Registry(directory, {device_id: record}, [])


def write_record(directory: str | Path, record: DeviceRecord) -> Path:
    """Write (or replace) one record atomically: temp file, fsync, rename, mode 0644 (a
    record holds public keys and hashes only, so the gateway's service user can read it)."""
    record = record_from_dict(record.to_dict(), record.device_id)  # validate before writing
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{record.device_id}.json"
    text = json.dumps(record.to_dict(), indent=2, sort_keys=True) + "\n"
    write_atomic(target, text, 0o644)
    return target


def revoke(directory: str | Path, device_id: str) -> DeviceRecord:
    """Mark a device revoked (the gateway rejects it after its next SIGHUP)."""
    path = Path(directory) / f"{device_id}.json"
    if not path.exists():
        raise RegistryError(f"device {device_id} is not in the registry {directory}")
    record = replace(load_record(path), status="revoked")
    write_record(directory, record)
    return record


def rollover(directory: str | Path, device_id: str, new_public_pem: str,
             keep_old_s: float) -> DeviceRecord:
    """Make `new_public_pem` the device's key and keep its old key accepted for
    `keep_old_s` seconds: what the node signed before it switches, and the node itself
    until it does (0: the old key is refused at once, as after a theft). Asked again
    with the same new key (a re-run after a break), it changes nothing."""
    path = Path(directory) / f"{device_id}.json"
    if not path.exists():
        raise RegistryError(f"device {device_id} is not in the registry {directory}")
    record = load_record(path)
    if record.alg != "ES256":
        raise RegistryError(f"{device_id} signs with HMAC256: give it a key with "
                            "citynode-provision keys, not a rollover")
    new = _point(_load_p256(new_public_pem, device_id))
    if new == _point(_load_p256(record.public_key_pem or "", device_id)):
        return record
    until = datetime.now(UTC).timestamp() + keep_old_s
    record = replace(
        record, public_key_pem=new_public_pem, status="active",
        rollover_public_key_pem=record.public_key_pem if keep_old_s > 0 else None,
        rollover_until=(datetime.fromtimestamp(until, UTC).replace(microsecond=0)
                        .isoformat().replace("+00:00", "Z")) if keep_old_s > 0 else None)
    write_record(directory, record)
    return record


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)

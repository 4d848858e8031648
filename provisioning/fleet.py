"""The provisioning side of the fleet registry: locking, writability, key conflicts.

The record format and atomic writes belong to citynode/registry.py (shared with the
gateway); this module adds what a technician's CLI needs around it: one writer at
a time (flock on <registry>/.lock), a clear error when the directory cannot be
written, and the refusal to silently replace a registered device's key.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from citynode import registry as reg

from .errors import KeyConflict, RegistryWriteError

LOCK_NAME = ".lock"


def _not_writable(directory: Path, exc: OSError) -> RegistryWriteError:
    return RegistryWriteError(
        f"registry directory {directory} is not writable ({exc.strerror or exc})",
        f"fix its permissions ('sudo chown -R $USER {directory}') or pass another --registry")


def ensure_writable(directory: Path) -> None:
    """Create the directory (0700) and prove a file can be written, before any board is touched."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = directory / f".probe-{os.getpid()}-{time.monotonic_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise _not_writable(directory, exc) from None


@contextlib.contextmanager
def locked(directory: Path, timeout: float = 15.0) -> Iterator[None]:
    """Exclusive lock on the registry for one read-modify-write."""
    ensure_writable(directory)
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise _not_writable(directory, exc) from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise _not_writable(directory, exc) from None
                if time.monotonic() > deadline:
                    raise RegistryWriteError(
                        f"registry {directory} is locked by another process for more than "
                        f"{timeout:g} s",
                        f"wait for the other citynode-provision to finish ('fuser -v "
                        f"{directory / LOCK_NAME}' shows it), then re-run") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def read(directory: Path, device_id: str) -> reg.DeviceRecord | None:
    path = directory / f"{device_id}.json"
    if not path.exists():
        return None
    try:
        return reg.load_record(path)
    except reg.RegistryError as exc:
        raise RegistryWriteError(str(exc), "fix or remove the file, then re-run") from None


def register(directory: Path, record: reg.DeviceRecord, force_rekey: bool = False
             ) -> tuple[reg.DeviceRecord, str]:
    """Write the record unless an equal one is there; returns (record, how).

    `how` is 'created', 'updated' or 'unchanged'.

    A different key for a registered device is refused unless force_rekey: a
    swapped or re-flashed board must not take over a pole's identity by accident.
    """
    with locked(directory):
        old = read(directory, record.device_id)
        if old is not None:
            same_key = (old.alg == record.alg and old.public_key_pem == record.public_key_pem
                        and old.key_ref == record.key_ref)
            if not same_key and not force_rekey:
                raise KeyConflict(
                    f"device {record.device_id} is already registered with another key "
                    f"(registered {old.provisioned_at or 'earlier'}, status {old.status})",
                    "if this board was re-flashed or replaced on purpose, re-run with "
                    "--force-rekey; otherwise you may have the wrong board")
            if same_key and old.status == "revoked" and not force_rekey:
                raise KeyConflict(
                    f"device {record.device_id} is revoked with this very key",
                    "give it a new key: citynode-provision rotate --port PORT")
            fresh = replace(record, provisioned_at=old.provisioned_at)
            if same_key and old.status == "active" and fresh == old:
                return old, "unchanged"
        record = replace(record, provisioned_at=reg.now_iso())
        try:
            reg.write_record(directory, record)
        except OSError as exc:
            raise _not_writable(directory, exc) from None
        except reg.RegistryError as exc:
            raise RegistryWriteError(str(exc), "check the values passed on the command line"
                                     ) from None
        return record, "created" if old is None else "updated"


def rollover(directory: Path, device_id: str, new_public_pem: str, keep_old_s: float
             ) -> reg.DeviceRecord:
    """registry.rollover under the registry's lock: the new key, the old one kept."""
    with locked(directory):
        try:
            return reg.rollover(directory, device_id, new_public_pem, keep_old_s)
        except reg.RegistryError as exc:
            raise RegistryWriteError(str(exc), "check the device id and --registry") from None
        except OSError as exc:
            raise _not_writable(directory, exc) from None


def revoke(directory: Path, device_id: str) -> reg.DeviceRecord:
    with locked(directory):
        try:
            return reg.revoke(directory, device_id)
        except reg.RegistryError as exc:
            raise RegistryWriteError(str(exc), "check the device id ('cn-' + 12 hex digits) and "
                                     "--registry") from None
        except OSError as exc:
            raise _not_writable(directory, exc) from None

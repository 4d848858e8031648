"""Errors a technician can act on: each names what went wrong and what to do next.

Modules raise these; only cli.py turns them into exit codes, so the library can be
driven from tests and scripts without parsing text.
"""

from __future__ import annotations

# exit codes by family, so a script can tell a cable problem from a registry problem
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PORT = 3
EXIT_FLASH = 4
EXIT_DEVICE = 5
EXIT_REGISTRY = 6
EXIT_VERIFY = 7


class ProvisionError(Exception):
    """Base: `message` says what happened, `fix` what to do about it."""

    exit_code = EXIT_FAILED
    kind = "failed"

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message}; {self.fix}" if self.fix else self.message

    def to_dict(self) -> dict[str, str]:
        return {"error": self.kind, "message": self.message, "fix": self.fix}


class UsageError(ProvisionError):
    exit_code = EXIT_USAGE
    kind = "usage"


class PortError(ProvisionError):
    """No port, wrong path, permission denied, port busy, timeouts on the link."""

    exit_code = EXIT_PORT
    kind = "port"


class FlashError(ProvisionError):
    """Wrong chip, image problems, download mode not reached, write/verify failures."""

    exit_code = EXIT_FLASH
    kind = "flash"


class DeviceError(ProvisionError):
    """The board's MicroPython: absent, too old, or a command that failed on it."""

    exit_code = EXIT_DEVICE
    kind = "device"


class NoMicroPython(DeviceError):
    kind = "no-micropython"


class RegistryWriteError(ProvisionError):
    exit_code = EXIT_REGISTRY
    kind = "registry"


class KeyConflict(RegistryWriteError):
    kind = "key-conflict"


class VerifyError(ProvisionError):
    exit_code = EXIT_VERIFY
    kind = "verify"

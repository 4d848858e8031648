"""Errors a technician can act on: each names what went wrong and what to do next.

Modules raise these; only cli.py turns them into exit codes, so the library can be
driven from tests and scripts without parsing text.
"""

from __future__ import annotations

from citynode.cli import EXIT_USAGE, CliError

# exit codes by family, so a script can tell a cable problem from a registry problem
# (docs/cli.md); 1 and 2 are every citynode command's
EXIT_PORT = 3
EXIT_FLASH = 4
EXIT_DEVICE = 5
EXIT_REGISTRY = 6
EXIT_VERIFY = 7


class ProvisionError(CliError):
    """Base: `message` says what happened, `fix` what to do about it."""


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

"""Serial ports: find them, match them by USB serial number, explain why one cannot be opened.

A board re-enumerates after a reset (ttyUSB0 becomes ttyUSB1), so a port seen with
a USB serial number is re-found by that number. Device paths are checked before
opening, because pyserial's own errors ("could not open port") do not tell a
technician to join the dialout group or which process holds the port.
"""

from __future__ import annotations

import errno
import grp
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass

import serial
from serial.tools import list_ports

from .errors import PortError

# USB-serial bridges found on ESP32 boards (boards.yaml names the ones we ship)
KNOWN_BRIDGES = {(0x10C4, 0xEA60), (0x1A86, 0x7523), (0x1A86, 0x55D4), (0x0403, 0x6001),
                 (0x0403, 0x6010), (0x0403, 0x6015), (0x303A, 0x1001)}


@dataclass(frozen=True)
class PortInfo:
    device: str
    description: str = ""
    vid: int | None = None
    pid: int | None = None
    serial_number: str | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.vid is not None:
            out["vid"], out["pid"] = f"0x{self.vid:04x}", f"0x{self.pid or 0:04x}"
        return out


def is_url(port: str) -> bool:
    return "://" in port


def list_serial_ports(all_ports: bool = False) -> list[PortInfo]:
    """USB serial ports that look like ESP32 boards (every port with all_ports)."""
    found = []
    for p in list_ports.comports():
        if not all_ports and (p.vid is None or (p.vid, p.pid) not in KNOWN_BRIDGES):
            continue
        found.append(PortInfo(p.device, p.description or "", p.vid, p.pid, p.serial_number))
    return sorted(found, key=lambda p: p.device)


def describe(port: str) -> PortInfo:
    """What the OS knows about a port (URLs have no USB identity)."""
    if not is_url(port):
        real = os.path.realpath(port)
        for p in list_ports.comports():
            if p.device in (port, real):
                return PortInfo(port, p.description or "", p.vid, p.pid, p.serial_number)
    return PortInfo(port)


def find_by_serial(serial_number: str) -> str | None:
    """The current device path of the board with this USB serial number."""
    for p in list_ports.comports():
        if p.serial_number == serial_number:
            return p.device
    return None


def check_port(port: str) -> None:
    """Raise PortError with the fix when a device path cannot be used; URLs pass through."""
    if is_url(port):
        if not port.startswith(("rfc2217://", "socket://", "loop://")):
            raise PortError(f"{port}: not a serial URL this tool can open",
                            "use a device path (/dev/ttyUSB0) or rfc2217://host:port")
        return
    if not os.path.exists(port):
        seen = ", ".join(p.device for p in list_serial_ports()) or "none"
        raise PortError(f"no serial port {port} (boards detected: {seen})",
                        "check the USB cable (a charge-only cable shows no port), run "
                        "'citynode-provision detect', and pass the path it lists with --port")
    if not os.access(port, os.R_OK | os.W_OK):
        raise PortError(f"permission denied on {port}", permission_fix(port))


def permission_fix(port: str) -> str:
    try:
        group = grp.getgrgid(os.stat(port).st_gid).gr_name
    except (OSError, KeyError):
        group = "dialout"
    return (f"add yourself to the {group} group: 'sudo usermod -aG {group} $USER', "
            "then log out and back in (or run 'newgrp " + group + "')")


def holders(port: str) -> str:
    """Which processes hold a device open, as `fuser -v` reports it (best effort)."""
    if is_url(port) or shutil.which("fuser") is None:
        return ""
    try:
        proc = subprocess.run(["fuser", "-v", port], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = [ln.strip() for ln in proc.stderr.splitlines()[1:] if ln.strip()]
    return "; ".join(lines)


def open_error(port: str, exc: BaseException) -> PortError:
    """Translate an open() failure into what the technician should do."""
    err = getattr(exc, "errno", None)
    text = str(exc)
    if err in (errno.EACCES, errno.EPERM) or "Permission denied" in text:
        return PortError(f"permission denied on {port}", permission_fix(port))
    if err == errno.EBUSY or "busy" in text.lower() or "exclusively lock" in text:
        who = holders(port)
        return PortError(f"{port} is busy" + (f" (held by: {who})" if who else ""),
                         "close the other program using it (serial monitor, another "
                         f"citynode-provision, ModemManager); 'fuser -v {port}' shows it")
    if err == errno.ENOENT:
        return PortError(f"{port} disappeared", "re-plug the board and run detect")
    if is_url(port):
        return PortError(f"cannot connect to {port} ({text})",
                         "check that the RFC 2217 server (or emulator) is running on that port")
    return PortError(f"cannot open {port} ({text})", "re-plug the board and try again")


def open_serial(port: str, baud: int = 115200, timeout: float = 1.0) -> serial.SerialBase:
    check_port(port)
    try:
        return serial.serial_for_url(port, baudrate=baud, timeout=timeout, exclusive=True)
    except (serial.SerialException, OSError) as exc:
        raise open_error(port, exc) from None

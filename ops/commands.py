"""The commands a node carries out, their arguments checked before anything is signed
(the node checks them again: firmware/node/app.py), and the signed command itself."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from citynode import wire

from .home import OpsError

MAX_EXPIRES_S = 600     # gateways and nodes refuse a command older than this anyway
DEFAULT_EXPIRES_S = 300


def _int_in(low: int, high: int, unit: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"a whole number of {unit}") from None
        if not low <= value <= high:
            raise ValueError(f"{low}..{high} {unit}")
        return value
    return parse


def _time_of_day(text: str) -> str:
    hours, sep, mins = text.partition(":")
    if not (sep and hours.isdigit() and mins.isdigit() and len(mins) == 2
            and int(hours) < 24 and int(mins) < 60):
        raise ValueError("a time of day, HH:MM")
    return f"{int(hours):02d}:{mins}"


@dataclass(frozen=True)
class Spec:
    help: str
    args: dict[str, Callable[[str], object]]
    required: tuple[str, ...] = ()


COMMANDS: dict[str, Spec] = {
    "lamp": Spec("hold the lamp at a level for some minutes (default 60), over the "
                 "node's lighting rules", {"level": _int_in(0, 100, "%"),
                                           "minutes": _int_in(1, 1440, "minutes")}, ("level",)),
    "lamp_auto": Spec("end an override: the node's lighting rules decide again", {}),
    "set_lighting": Spec("change the node's lighting rules (kept across resets; "
                         "docs/operations.md)", {
                             "dusk_lux": _int_in(0, 1000, "lx"),
                             "dawn_lux": _int_in(0, 5000, "lx"),
                             "hold_s": _int_in(1, 600, "s"),
                             "night_level": _int_in(0, 100, "%"),
                             "quiet_level": _int_in(0, 100, "%"),
                             "event_level": _int_in(0, 100, "%"),
                             "event_s": _int_in(1, 3600, "s"),
                             "utc_offset_min": _int_in(-720, 840, "minutes"),
                             "quiet_from": _time_of_day, "quiet_until": _time_of_day,
                             "on_at": _time_of_day, "off_at": _time_of_day}),
    "set_interval": Spec("the window (no sensor=) or one sensor's sampling interval",
                         {"seconds": _int_in(5, 3600, "s"), "sensor": str}, ("seconds",)),
    "reboot": Spec("restart the node (it answers first)", {}),
    "report_config": Spec("the node's settings, secrets left out", {}),
    "rotate_key": Spec("key rollover, phase one: the node makes its next key", {}),
    "commit_key": Spec("key rollover, phase two: the node signs with its next key", {}),
}


def parse_args(name: str, pairs: list[str]) -> dict:
    """`key=value` words as the command's argument map; an OpsError that says what fits."""
    spec = COMMANDS.get(name)
    if spec is None:
        raise OpsError(f"no command {name!r}", "one of: " + ", ".join(COMMANDS))
    args: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in spec.args:
            raise OpsError(f"{name}: no argument {pair!r}",
                           f"{name} takes " + (", ".join(f"{k}=..." for k in spec.args)
                                               or "no arguments"))
        try:
            args[key] = spec.args[key](text)
        except ValueError as exc:
            raise OpsError(f"{name}: {key}={text!r} is not {exc}", f"give {key} as {exc}") \
                from None
    if spec.args and not spec.required and not args:
        raise OpsError(f"{name} needs at least one of " + ", ".join(spec.args),
                       f"e.g. {name} {next(iter(spec.args))}=...")
    missing = [k for k in spec.required if k not in args]
    if missing:
        raise OpsError(f"{name} needs {', '.join(missing)}",
                       "e.g. " + " ".join(f"{k}=..." for k in missing))
    return args


def signed(key: ec.EllipticCurvePrivateKey, device: str, seq: int, name: str, args: dict,
           expires_s: int, now: float | None = None) -> bytes:
    """The COSE_Sign1 command: issued now, refused by gateway and node after expires_s."""
    issued = int(time.time() if now is None else now)
    body = wire.encode_command(device, seq, name, args, issued, issued + expires_s)
    return wire.sign_es256(body, wire.OPERATOR_KID, key)

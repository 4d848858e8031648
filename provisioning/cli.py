"""citynode-provision: the technician's command line.

    citynode-provision detect [--port P]... [--no-chip]
    citynode-provision flash     --port P --board B [--image F]
    citynode-provision deploy    --port P --board B --site S --pole P --broker H:P --wifi-ssid N
    citynode-provision keys      --port P --board B --registry DIR [--hmac] [--operator-key F]
    citynode-provision verify    --port P --registry DIR
    citynode-provision rotate    DEVICE --port P --registry DIR [--keep-old-days N]
    citynode-provision rollover  DEVICE --registry DIR --key HEX [--keep-old-days N]
    citynode-provision revoke    DEVICE --registry DIR
    citynode-provision provision --port P... | --all  --board B --registry DIR --site S --pole P ...

Every command takes --json (JSON lines on stdout: events, then one result object)
and exits non-zero on failure; errors say what to do. Secrets (the Wi-Fi password)
come from a file, an environment variable or a prompt, never from argv.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from citynode import cli, wire
from citynode.boards import BoardCatalogueError, get_board

from . import deploy, flash, fleet, keys, ports, provision, receipts, verify
from .device import Session
from .errors import EXIT_PORT, FlashError, PortError, ProvisionError, UsageError
from .events import BarSink, Events, json_sink


def _common(p: argparse.ArgumentParser, port: bool = True, many: bool = False) -> None:
    if port:
        p.add_argument("--port", action="append" if many else None, default=None,
                       help="device path or pyserial URL (/dev/ttyUSB0, rfc2217://host:port)"
                       + ("; repeat for several boards" if many else ""))
    p.add_argument("--json", action="store_true", help="JSON lines on stdout for scripts")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the board on each serial exchange (default 10)")


def _board_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--board", required=required, help="board name from boards.yaml")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--site", required=True)
    p.add_argument("--pole", required=True)
    p.add_argument("--lat", type=float, default=0.0)
    p.add_argument("--lon", type=float, default=0.0)
    p.add_argument("--height", type=float, metavar="M",
                   help="mounting height above the ground, in metres (for locating sounds)")
    p.add_argument("--broker", default="192.168.4.1:1883", help="the pole gateway's MQTT HOST:PORT")
    p.add_argument("--ntp", metavar="HOST:PORT",
                   help="the pole's time server (default: the broker's host, port 123)")
    p.add_argument("--wifi-ssid", required=True)
    p.add_argument("--wifi-password-file", help="file holding the Wi-Fi password")
    p.add_argument("--wifi-password-env", metavar="VAR",
                   help="environment variable holding the Wi-Fi password")
    p.add_argument("--window-s", type=int, default=60)
    p.add_argument("--healthy-s", type=int, default=deploy.HEALTHY_S, metavar="S",
                   help="a boot this long healthy is good: it clears the crash count and "
                        f"keeps an update on trial (default {deploy.HEALTHY_S})")
    p.add_argument("--firmware-dir", type=Path, help="firmware tree to deploy (default: ours)")
    p.add_argument("--no-mpy", action="store_true", help="deploy .py even if .mpy would load")


def _image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", help="MicroPython .bin (default: the board's firmware_cache file)")
    p.add_argument("--firmware-cache", help="folder of MicroPython images "
                   "(default $CITYNODE_FIRMWARE_CACHE or ~/.cache/citynode/firmware)")


def _registry_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", type=Path, required=True, help="fleet registry directory")


def _command(fn: Callable[[argparse.Namespace, Output], int]
             ) -> Callable[[argparse.Namespace], int]:
    """A subcommand's `func`: the command with the output its --json asks for."""
    return lambda args: fn(args, Output(args.json))


def _key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--operator-key", type=Path, help="operator public key (PEM) for downlinks")
    p.add_argument("--force-rekey", action="store_true",
                   help="replace a registered device's key (a replaced board)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="citynode-provision", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True)

    def command(name: str, text: str, fn: Callable[[argparse.Namespace, Output], int],
                many: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text)
        p.set_defaults(func=_command(fn))
        _common(p, many=many)
        return p

    p = command("detect", "ports, chip, MAC, MicroPython, provisioning state", cmd_detect, True)
    p.add_argument("--no-chip", action="store_true",
                   help="do not reset into download mode for chip/flash details")
    p.add_argument("--all-ports", action="store_true", help="list every serial port")

    p = command("flash", "write the MicroPython image, verified", cmd_flash)
    _board_args(p)
    _image_args(p)

    p = command("deploy", "copy the firmware (changed files only) and the config", cmd_deploy)
    _board_args(p)
    _config_args(p)

    p = command("keys", "key on the node, public key into the registry", cmd_keys)
    _board_args(p)
    _registry_arg(p)
    p.add_argument("--hmac", action="store_true", help="also give the node an HMAC secret and "
                   "register it as HMAC256 (low-power option)")
    _key_args(p)

    for name, text, fn in (("rotate", "new key on the node, registry updated", cmd_rotate),
                           ("rollover", "accept a node's next key (from its rotate_key "
                            "answer)", cmd_rollover),
                           ("revoke", "mark a device revoked in the registry", cmd_revoke)):
        p = command(name, text, fn)
        p.add_argument("device", help="device id, cn-<12 hex>")
        _registry_arg(p)
        if fn is cmd_rollover:
            p.add_argument("--key", required=True, help="the next key's public key, hex (the "
                           "node's answer to rotate_key: 'next <hex>')")
        if fn is not cmd_revoke:
            p.add_argument("--keep-old-days", type=float, default=7.0,
                           help="days the old key stays accepted, for what the node signed "
                           "with it (default 7; 0 after a theft: refused at once)")

    p = command("verify", "signed self-test, checked against the registry", cmd_verify)
    _registry_arg(p)

    p = command("provision", "everything, idempotent, several boards at once", cmd_provision,
                many=True)
    p.add_argument("--all", action="store_true", help="every detected board")
    _board_args(p)
    _registry_arg(p)
    _config_args(p)
    _image_args(p)
    p.add_argument("--no-flash", action="store_true", help="never flash (board has MicroPython)")
    p.add_argument("--force-flash", action="store_true", help="flash even if the image is there")
    _key_args(p)
    p.add_argument("--labels", type=Path, help="label folder (default REGISTRY/labels)")
    p.add_argument("--technician", help="name on the receipt (default $CITYNODE_TECHNICIAN/user)")
    return top


# --- output ------------------------------------------------------------------------
class Output:
    """Progress events (bars, or JSON lines with --json) and the command's one result."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.events = Events([json_sink() if as_json else BarSink()])

    def result(self, obj: dict[str, Any], human: str) -> None:
        cli.print_result(obj, human, self.as_json)


def _one_port(args: argparse.Namespace) -> str:
    if not args.port:
        raise UsageError("no --port given", "run 'citynode-provision detect' and pass --port")
    return args.port


def _board(name: str):
    try:
        return get_board(name)
    except BoardCatalogueError as exc:
        raise UsageError(str(exc), "pass one of the boards in boards.yaml") from None


def read_password(args: argparse.Namespace) -> str | None:
    """From a file, an env var or a prompt; None when none is offered (keep the node's)."""
    if getattr(args, "wifi_password_file", None):
        try:
            return Path(args.wifi_password_file).read_text().rstrip("\r\n")
        except OSError as exc:
            raise UsageError(f"cannot read the Wi-Fi password file ({exc.strerror})",
                             "check --wifi-password-file") from None
    if getattr(args, "wifi_password_env", None):
        value = os.environ.get(args.wifi_password_env)
        if value is None:
            raise UsageError(f"environment variable {args.wifi_password_env} is not set",
                             "export it or use --wifi-password-file")
        return value
    if sys.stdin.isatty() and not getattr(args, "json", False):
        return getpass.getpass("Wi-Fi password (not echoed; empty keeps the node's): ") or None
    return None


# --- commands ----------------------------------------------------------------------
def cmd_detect(args: argparse.Namespace, out: Output) -> int:
    found = ([ports.describe(p) for p in args.port] if args.port
             else ports.list_serial_ports(args.all_ports))
    if not found:
        raise ProvisionError("no serial port with an ESP32 board found",
                             "plug the board in with a data cable ('dmesg -w' shows whether "
                             "the USB-serial bridge appears), or pass --port")
    rows = []
    port_errors = 0
    for info in found:
        ev = out.events.for_port(info.device)
        row: dict[str, Any] = info.to_dict()
        row["port"] = row.pop("device")
        if not args.no_chip:
            try:
                ev.start("detect", "reading chip, MAC, flash through download mode")
                row.update(flash.chip_info(info.device).to_dict())
            except FlashError as exc:  # e.g. no DTR/RTS wiring: MicroPython may still answer
                row["chip_problem"] = exc.message
                ev.info("detect", str(exc))
            except PortError:
                pass  # reported by the MicroPython probe below
        try:
            ev.start("detect", "asking MicroPython")
            with provision.open_session(info.device, args.timeout, info.serial_number,
                                        wait=0 if args.no_chip else 10) as s:
                probe = s.probe()
            row["micropython"] = ".".join(map(str, probe["micropython"]))
            row["mac"] = row.get("mac") or probe.get("mac")
            row["firmware"] = probe.get("firmware")
            row["device_id"] = (probe.get("config") or {}).get("device")
            row["provisioned"] = bool(probe.get("provisioned"))
            ev.done("detect", f"MicroPython {row['micropython']}")
        except ProvisionError as exc:
            row["micropython"] = None
            row["problem"] = exc.message
            port_errors += isinstance(exc, PortError)
            ev.info("detect", str(exc))
        rows.append(row)
    lines = [f"{'port':<28} {'usb':<10} {'chip':<8} {'mac':<13} {'flash':>6} "
             f"{'micropython':<12} {'device':<16} state"]
    for r in rows:
        usb = f"{r['vid'][2:]}:{r['pid'][2:]}" if r.get("vid") else "-"
        size = f"{r['flash_size'] >> 20}MB" if r.get("flash_size") else "-"
        state = ("provisioned" if r.get("provisioned") else
                 r.get("problem") or "not provisioned")
        lines.append(f"{r['port']:<28} {usb:<10} {r.get('chip') or '-':<8} "
                     f"{r.get('mac') or '-':<13} {size:>6} {r.get('micropython') or '-':<12} "
                     f"{r.get('device_id') or '-':<16} {state}")
    out.result({"ports": rows}, "\n".join(lines))
    return EXIT_PORT if port_errors else 0


def cmd_flash(args: argparse.Namespace, out: Output) -> int:
    port = _one_port(args)
    board = _board(args.board)
    image = flash.load_image(board, args.image, args.firmware_cache)
    info = flash.flash(port, board, image, out.events.for_port(port))
    out.result({"ok": True, "port": port, **info.to_dict(), "image": str(image.path),
                "image_sha256": image.sha256},
               f"flashed {image.path.name} on {port} ({info.chip}, MAC {info.mac}), verified")
    return 0


def _plan_for(args: argparse.Namespace, board, probe: dict) -> deploy.Plan:
    fw = args.firmware_dir or deploy.firmware_dir()
    deploy.check_micropython(fw, probe)
    plan = deploy.build_plan(fw, probe, False if args.no_mpy else None)
    device = wire.device_id(probe["mac"])
    cfg = deploy.build_config(board, device, args.site, args.pole, args.lat, args.lon,
                              args.broker, args.wifi_ssid, window_s=args.window_s,
                              ntp=args.ntp, height_m=args.height, healthy_s=args.healthy_s)
    plan.extra[deploy.CONFIG_PATH] = deploy.config_bytes(cfg)
    password = read_password(args)
    if password is not None:
        plan.extra[deploy.WIFI_SECRET_PATH] = deploy.secret_bytes(password)
    return plan


def cmd_deploy(args: argparse.Namespace, out: Output) -> int:
    port = _one_port(args)
    board = _board(args.board)
    ev = out.events.for_port(port)
    with Session(port, timeout=args.timeout) as s:
        probe = s.probe()
        plan = _plan_for(args, board, probe)
        result = deploy.apply(s, plan, ev)
        s.reset()
    summary = {"ok": True, "port": port, "device": wire.device_id(probe["mac"]),
               "written": result.written, "removed": result.removed,
               "unchanged": result.unchanged, "compiled_mpy": result.compiled,
               "files_sha256": result.firmware_hash}
    human = (f"deployed to {port}: {len(result.written)} written, {result.unchanged} unchanged"
             if result.changed else f"{port}: firmware and config already current, nothing copied")
    out.result(summary, human)
    return 0


def cmd_keys(args: argparse.Namespace, out: Output) -> int:
    port = _one_port(args)
    board = _board(args.board)
    fleet.ensure_writable(args.registry)
    ev = out.events.for_port(port)
    operator = keys.load_operator_key(args.operator_key) if args.operator_key else None
    with Session(port, timeout=args.timeout) as s:
        probe = s.probe()
        cfg = probe.get("config") or {}
        device = wire.device_id(probe["mac"])
        if cfg.get("device") != device:
            raise UsageError(f"{port} has no node config for {device}",
                             "run deploy first (it writes /config.json)")
        key = keys.ensure_key(s)
        ev.done("keys", ("generated on the node" if key.created else "already on the node")
                + f", fingerprint {key.fingerprint[:16]}")
        key_ref = None
        if args.hmac:
            import secrets as _secrets

            secret = _secrets.token_bytes(32)
            keys.install_hmac_secret(s, secret)
            key_ref = keys.write_hmac_secret(args.registry, device, secret)
            ev.done("keys", "HMAC secret installed on the node and stored as " + key_ref)
        if operator is not None:
            keys.install_operator_key(s, operator)
            ev.done("keys", "operator key installed")
        registered = fleet.read(args.registry, device)
        login = keys.broker_login(s, registered.broker_hash if registered else None)
        if login.new_secret is not None:
            s.write_file(deploy.BROKER_SECRET_PATH, deploy.secret_bytes(login.new_secret))
            ev.done("keys", "pole broker password made and written to the node")
    from citynode import registry as reg

    record = reg.DeviceRecord(
        device_id=device, alg="HMAC256" if args.hmac else "ES256", board=board.name,
        site=cfg.get("site") or "unknown", pole=cfg.get("pole") or "unknown",
        lat=float(cfg.get("lat") or 0.0), lon=float(cfg.get("lon") or 0.0),
        height_m=cfg.get("height_m"), firmware=probe.get("firmware") or "unknown",
        public_key_pem=None if args.hmac else key.pem, key_ref=key_ref, broker_hash=login.hash)
    _, how = fleet.register(args.registry, record, args.force_rekey)
    out.result({"ok": True, "device": device, "registry": how, "key_fingerprint": key.fingerprint,
                "key_created": key.created},
               f"{device}: key {'generated' if key.created else 'kept'} "
               f"(fingerprint {key.fingerprint[:16]}), registry entry {how}")
    return 0


def cmd_rotate(args: argparse.Namespace, out: Output) -> int:
    """A key rollover over the cable: the node makes its next key, the registry accepts
    it beside the old one, then the node switches. A break at any point leaves a node
    whose envelopes verify; a re-run finishes the job (the node keeps its next key)."""
    port = _one_port(args)
    old = fleet.read(args.registry, args.device)
    if old is None:
        raise UsageError(f"{args.device} is not in the registry {args.registry}",
                         "provision it first")
    with Session(port, timeout=args.timeout) as s:
        probe = s.probe()
        found = wire.device_id(probe.get("mac", ""))
        if found != args.device:
            raise UsageError(f"the board on {port} is {found}, not {args.device}",
                             "connect the right board")
        key = keys.next_key(s)
        if old.alg == "ES256":
            fleet.rollover(args.registry, args.device, key.pem, _keep_old_s(args))
        keys.commit_next_key(s)
        if old.alg != "ES256":   # an HMAC node: its ES256 key is registered from now on
            from dataclasses import replace

            fleet.register(args.registry, replace(old, alg="ES256", public_key_pem=key.pem,
                                                  key_ref=None), force_rekey=True)
        checked = verify.verify(s, args.registry, args.device)
        s.reset()
    out.result({"ok": True, "device": args.device, "key_fingerprint": key.fingerprint,
                "verified": True, "seq": checked.seq, "keep_old_days": args.keep_old_days},
               f"{args.device}: new key {key.fingerprint[:16]} registered and verified; "
               f"the old key is accepted for {args.keep_old_days:g} more day(s)")
    return 0


def cmd_rollover(args: argparse.Namespace, out: Output) -> int:
    """Phase one of a rollover over the air: the operator sent rotate_key, the node
    answered with its next key (signed with its current one); the registry accepts both
    from now on. Then the operator sends commit_key."""
    try:
        key = keys.NodeKey(keys.parse_public(args.key), created=False)
    except ValueError as exc:
        raise UsageError(f"--key: {exc}", "pass the hex after 'next' in the node's answer "
                         "to rotate_key") from None
    record = fleet.rollover(args.registry, args.device, key.pem, _keep_old_s(args))
    out.result({"ok": True, "device": args.device, "key_fingerprint": key.fingerprint,
                "rollover_until": record.rollover_until},
               f"{args.device}: key {key.fingerprint[:16]} registered; the old key is "
               f"accepted until {record.rollover_until or 'now only'}. Reload the gateways, "
               "then send the node commit_key")
    return 0


def _keep_old_s(args: argparse.Namespace) -> float:
    if args.keep_old_days < 0:
        raise UsageError("--keep-old-days must be 0 or more", "pass the number of days")
    return args.keep_old_days * 86400


def cmd_revoke(args: argparse.Namespace, out: Output) -> int:
    record = fleet.revoke(args.registry, args.device)
    out.result({"ok": True, "device": record.device_id, "status": record.status},
               f"{record.device_id} revoked; the gateway rejects it after its next reload "
               "(SIGHUP)")
    return 0


def cmd_verify(args: argparse.Namespace, out: Output) -> int:
    port = _one_port(args)
    ev = out.events.for_port(port)
    ev.start("verify", "running the self-test on the node")
    with Session(port, timeout=args.timeout) as s:
        checked = verify.verify(s, args.registry)
        s.reset()
    lines = [f"{checked.device}: self-test envelope seq {checked.seq} verified with the "
             f"registry key ({checked.fingerprint[:16]}), firmware {checked.firmware}, "
             f"MicroPython {checked.micropython}"]
    for name, rep in sorted(checked.sensors.items()):
        detail = rep.get("error") or rep.get("readings") or "no reading yet"
        lines.append(f"  {name:<8} {rep.get('status'):<10} {detail}")
    out.result({"ok": True, **checked.to_dict()}, "\n".join(lines))
    return 0


def cmd_provision(args: argparse.Namespace, out: Output) -> int:
    board = _board(args.board)
    if args.all:
        port_list = [p.device for p in ports.list_serial_ports()]
        if not port_list:
            raise ProvisionError("--all: no ESP32 board detected",
                                 "plug the boards in with data cables, or pass --port")
    else:
        port_list = args.port or []
    if not port_list:
        raise UsageError("no --port given", "pass --port (repeatable) or --all")
    for p in port_list:
        ports.check_port(p)
    fleet.ensure_writable(args.registry)
    image = None
    if not args.no_flash:
        try:
            image = flash.load_image(board, args.image, args.firmware_cache)
        except UsageError:
            if args.image:
                raise
    opts = provision.Options(
        board=board, registry=args.registry, site=args.site, pole=args.pole, lat=args.lat,
        lon=args.lon, height_m=args.height, broker=args.broker, ntp=args.ntp,
        wifi_ssid=args.wifi_ssid,
        wifi_password=read_password(args), image=image, force_flash=args.force_flash,
        firmware_dir=args.firmware_dir, use_mpy=False if args.no_mpy else None,
        window_s=args.window_s, healthy_s=args.healthy_s,
        operator_key=keys.load_operator_key(args.operator_key) if args.operator_key else None,
        force_rekey=args.force_rekey, labels_dir=args.labels,
        technician=args.technician or receipts.technician(), timeout=args.timeout)
    deploy.build_config(board, "cn-000000000000", args.site, args.pole, args.lat, args.lon,
                        args.broker, args.wifi_ssid, ntp=args.ntp,
                        healthy_s=args.healthy_s)  # bad options: before any board
    results = provision.provision_many(opts, port_list, out.events)
    lines = [f"{'port':<28} {'device':<16} {'result':<12} {'flash':<8} {'deploy':<12} "
             f"{'key':<9} {'registry':<10} {'time':>6}"]
    for r in results:
        lines.append(f"{r.port:<28} {r.device or '-':<16} {r.status:<12} "
                     f"{r.steps.get('flash', '-'):<8} {r.steps.get('deploy', '-'):<12} "
                     f"{r.steps.get('keys', '-'):<9} {r.steps.get('registry', '-'):<10} "
                     f"{r.seconds:>5.1f}s")
        if r.error:
            lines.append(f"    error: {r.error['message']}")
            if r.error.get("fix"):
                lines.append(f"    what to do: {r.error['fix']}")
    unchanged = all(r.status == "unchanged" for r in results)
    if unchanged:
        lines.append("all boards were already provisioned: nothing changed")
    failed = [r for r in results if r.status == "failed"]
    out.result({"ok": not failed, "boards": [r.to_dict() for r in results],
                "unchanged": unchanged}, "\n".join(lines))
    if not failed:
        return 0
    codes = {r.exit_code for r in failed}
    return codes.pop() if len(codes) == 1 else 1


def main(argv: list[str] | None = None) -> int:
    return cli.run("citynode-provision", parser(), argv,
                   interrupted="re-run the same command to continue where it stopped")


if __name__ == "__main__":
    sys.exit(main())

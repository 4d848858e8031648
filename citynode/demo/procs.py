"""The processes the demo starts, and how each one is started and stopped.

Every child runs in a process group of its own (a new session), for two reasons: a
Ctrl-C on the terminal reaches only the demo, which then stops its children in order
(nodes before the gateway before the brokers); and a whole group can be killed at
once, so the emulator's MicroPython processes go with it and nothing is left behind,
even when a step fails halfway.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from citynode.chrony import PoleTimeServer
from citynode.gateway.scrape import fetch_health, fetch_metrics
from citynode.mosquitto import Mosquitto, PoleBroker, free_port, free_port_range
from citynode.provisioning import deploy

BOARD = "esp32-devkitc"
# --update: a stock image, its app as .mpy files an update can replace (the devkitc's app
# is in ROMFS, which has no second slot: docs/ota.md)
UPDATE_BOARD = "esp32-wrover-kit"
HEALTHY_S = 15      # the demo's nodes keep an update after 15 s healthy (a pole's: 120)
GATEWAY_ID = "pole-demo"
TOPIC_PREFIX = "city/demo"
SITE, POLE, LAT, LON, HEIGHT_M = "demo", "P-1", 48.2082, 16.3738, 6.0
BIN = Path(sys.executable).parent


class StepFailed(RuntimeError):
    """A phase of the demo could not complete; says which, and where its log is."""

    def __init__(self, step: str, message: str, log: Path | None = None):
        where = f" (log: {log})" if log else ""
        super().__init__(f"{step} failed: {message}{where}")
        self.step, self.log = step, log


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: stop everything and exit."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalGuard:
    """SIGINT and SIGTERM raise Interrupted in the main thread, except inside `hold()`:
    there the signal waits until the block ends, so a process is never started without
    being recorded for the cleanup."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def ignore(self) -> None:
        """For the cleanup: a second Ctrl-C must not cut it short and leave strays."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)

    def _handler(self, signum: int, frame: object) -> None:
        if self.depth:
            self.pending = signum
            return
        raise Interrupted(signum)

    @contextmanager
    def hold(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)


GUARD = SignalGuard()


def tool(script: str, module: str) -> list[str]:
    """The console script next to this Python (the venv's), else `python -m module`."""
    path = BIN / script
    return [str(path)] if path.exists() else [sys.executable, "-m", module]


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path


class Processes:
    """Everything the demo started; `stop_all` ends each process group, last started first."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.children: list[Child] = []
        self.brokers: list[Mosquitto | PoleTimeServer] = []   # the servers, stopped last

    def spawn(self, name: str, argv: list[str], pipe_stdout: bool = False) -> Child:
        log = self.logs / f"{name}.log"
        with GUARD.hold(), log.open("ab") as handle:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe_stdout else handle, stderr=handle,
                text=pipe_stdout, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
            child = Child(name, proc, log)
            self.children.append(child)
        return child

    def broker(self, name: str) -> Mosquitto:
        """A Mosquitto with persistence, so a restart keeps sessions and queued messages."""
        broker = Mosquitto(self.logs / name, persistence=True, own_group=True)
        self.brokers.append(broker)
        return broker

    def pole_broker(self, name: str) -> PoleBroker:
        """The pole's broker as deploy/ ships it: locked, every client logs in."""
        broker = PoleBroker(self.logs / name, own_group=True)
        self.brokers.append(broker)
        return broker

    def time_server(self, name: str) -> PoleTimeServer:
        """The pole's time server as deploy/ ships it (chronyd), for the nodes' clocks."""
        server = PoleTimeServer(self.logs / name, own_group=True)
        self.brokers.append(server)
        return server

    def start_broker(self, broker: Mosquitto | PoleTimeServer) -> None:
        with GUARD.hold():
            broker.start()

    def stop(self, child: Child, timeout: float = 10.0) -> None:
        _end_group(child.proc, timeout)

    def stop_all(self, timeout: float = 10.0) -> None:
        for child in reversed(self.children):
            _end_group(child.proc, timeout)
        for broker in reversed(self.brokers):
            broker.stop(timeout)

    def pids(self) -> list[int]:
        procs = [c.proc for c in self.children] + [b.proc for b in self.brokers if b.proc]
        return [p.pid for p in procs if p.poll() is None]


def _end_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to the child's group, SIGKILL to what is left of it after `timeout`."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc.pid, signal.SIGKILL)  # the leader may be gone, its children not
    if proc.poll() is None:
        proc.wait(5)
    if proc.stdout:
        proc.stdout.close()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Lines:
    """A child's stdout as lines with a timeout (a reader thread), so a hung child
    cannot hang the demo."""

    def __init__(self, child: Child):
        self.child = child
        self.queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name=f"{child.name}-stdout", daemon=True).start()

    def _read(self) -> None:
        assert self.child.proc.stdout is not None
        try:
            for line in self.child.proc.stdout:
                self.queue.put(line)
        except (OSError, ValueError):  # the pipe was closed by the cleanup
            pass
        self.queue.put(None)

    def next(self, timeout: float) -> str | None:
        """The next line; None at end of output; TimeoutError after `timeout` seconds."""
        try:
            return self.queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            raise TimeoutError from None


# --- emulated boards ---------------------------------------------------------------------

@dataclass
class Board:
    name: str
    url: str
    state: Path
    device: str


def start_boards(procs: Processes, workdir: Path, count: int, scenario: dict, board: str,
                 timeout: float = 60.0) -> tuple[Child, list[Board]]:
    """`citynode-emu run --blank`: factory-fresh boards, each behind an RFC 2217 port."""
    scenario_file = workdir / "scenario.json"
    scenario_file.write_text(json.dumps(scenario, indent=1))
    boards_dir = workdir / "boards"
    boards_dir.mkdir(exist_ok=True)
    argv = tool("citynode-emu", "citynode.emulator.cli") + [
        "run", "--board", board, "--count", str(count), "--blank",
        "--link", str(boards_dir / "node0"), "--rfc2217", str(free_port_range(count)),
        "--state", str(boards_dir / "state"), "--scenario", str(scenario_file)]
    child = procs.spawn("emulator", argv, pipe_stdout=True)
    lines, boards = Lines(child), []
    deadline = time.monotonic() + timeout
    while len(boards) < count:
        try:
            line = lines.next(deadline - time.monotonic())
        except TimeoutError:
            raise StepFailed("starting the emulated boards",
                             f"no board reported within {timeout:.0f} s", child.log) from None
        if line is None:
            raise StepFailed("starting the emulated boards",
                             f"citynode-emu exited ({child.proc.wait()})", child.log)
        info = json.loads(line)
        boards.append(Board(Path(info["link"]).name, info["rfc2217"], Path(info["state"]),
                            "cn-" + info["mac"].replace(":", "").lower()))
    return child, boards


def write_image(procs: Processes, workdir: Path, board: str) -> Path:
    """The MicroPython stand-in image that provisioning flashes (CI cannot download one)."""
    image = workdir / f"micropython-{board}.bin"
    child = procs.spawn("image", tool("citynode-emu", "citynode.emulator.cli") + [
        "image", "--board", board, "-o", str(image)])
    if child.proc.wait(60) != 0:
        raise StepFailed("writing the MicroPython image", "citynode-emu image failed", child.log)
    return image


def ops_init(procs: Processes, workdir: Path, city: Mosquitto, registry: Path) -> Path:
    """The operator's folder (`citynode-ops init`): the key nodes and gateway trust."""
    home = workdir / "ops"
    child = procs.spawn("ops-init", tool("citynode-ops", "citynode.ops.cli") + [
        "--home", str(home), "init", "--broker", f"{city.host}:{city.port}", "--no-tls",
        "--prefix", TOPIC_PREFIX, "--registry", str(registry)])
    if child.proc.wait(60) != 0:
        raise StepFailed("creating the operator key", "citynode-ops init failed", child.log)
    return home


def operator_public(workdir: Path) -> Path:
    return workdir / "ops" / "operator.pub.pem"


def ops_run(procs: Processes, workdir: Path, words: list[str], timeout: float = 120) -> dict:
    """`citynode-ops WORDS --json` (send, ota): its result object (the nodes' answers)."""
    child = procs.spawn(f"ops-{words[0]}", tool("citynode-ops", "citynode.ops.cli") + [
        "--home", str(workdir / "ops"), *words, "--json"], pipe_stdout=True)
    out, _ = child.proc.communicate(timeout=timeout)
    with child.log.open("a") as log:
        log.write(out)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return lines[-1]["result"] if lines else {"message": f"no result; see {child.log}"}


def ops_bundle(procs: Processes, workdir: Path, board: str) -> tuple[str, Path]:
    """The shipped firmware as the next version, bundled and signed as an operator does
    (`citynode-ops bundle`, native code for the emulated boards' VM): (version, file)."""
    folder = workdir / "update"
    firmware = folder / "firmware"
    shutil.copytree(deploy.firmware_dir(), firmware,
                    ignore=shutil.ignore_patterns("__pycache__"))
    version_py = firmware / "node" / "version.py"
    text = version_py.read_text()
    old = re.search(r'VERSION = "(\d+)\.(\d+)\.(\d+)"', text)
    if old is None:
        raise StepFailed("building the update", f"no VERSION in {version_py}")
    major, minor, patch = map(int, old.groups())
    version = f"{major}.{minor}.{patch + 1}"
    version_py.write_text(text.replace(old.group(0), f'VERSION = "{version}"'))
    bundle = folder / f"citynode-{version}.cbor"
    child = procs.spawn("ops-bundle", tool("citynode-ops", "citynode.ops.cli") + [
        "--home", str(workdir / "ops"), "bundle", "--board", board, "--arch", "x64",
        "--firmware", str(firmware), "--out", str(bundle)])
    if child.proc.wait(120) != 0:
        raise StepFailed("building the update", "citynode-ops bundle failed", child.log)
    return version, bundle


def wifi_password_file(workdir: Path) -> Path:
    """A fresh Wi-Fi password: provisioning reads it from there, never argv."""
    return secret_file(workdir / "wifi-password")


def provision(procs: Processes, workdir: Path, boards: list[Board], board_name: str,
              broker: PoleBroker, clock: PoleTimeServer, registry: Path, window_s: int,
              on_event: Callable[[dict], None], timeout: float = 420.0) -> dict:
    """All boards in one `citynode-provision provision --json` run (they go in parallel);
    every progress event goes to `on_event`; returns the final result object."""
    image = write_image(procs, workdir, board_name)
    argv = tool("citynode-provision", "citynode.provisioning.cli") + ["provision"]
    for board in boards:
        argv += ["--port", board.url]
    argv += ["--board", board_name, "--image", str(image), "--registry", str(registry),
             "--site", SITE, "--pole", POLE, "--lat", str(LAT), "--lon", str(LON),
             "--height", str(HEIGHT_M),
             "--broker", f"{broker.host}:{broker.node_port}", "--wifi-ssid", "city",
             "--ntp", f"{clock.host}:{clock.port}",
             "--wifi-password-file", str(wifi_password_file(workdir)),
             "--window-s", str(window_s), "--healthy-s", str(HEALTHY_S),
             "--operator-key", str(operator_public(workdir)),
             "--json"]
    child = procs.spawn("provision", argv, pipe_stdout=True)
    lines, result = Lines(child), None
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.next(deadline - time.monotonic())
        except TimeoutError:
            raise StepFailed("provisioning", f"not done within {timeout:.0f} s",
                             child.log) from None
        if line is None:
            break
        with child.log.open("a") as log:
            log.write(line)
        event = _json_or_none(line)
        if event is None:
            continue
        if "result" in event:
            result = event["result"]
        else:
            on_event(event)
    code = child.proc.wait(30)
    if code != 0 or result is None:
        raise StepFailed("provisioning", f"citynode-provision exited {code}: "
                         f"{_failure(result)}; the boards' side is in "
                         f"{procs.logs / 'emulator.log'}", child.log)
    return result


def _json_or_none(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _failure(result: dict | None) -> str:
    if not result:
        return "no result"
    failed = [b for b in result.get("boards", []) if b.get("status") != "provisioned"]
    texts = [f"{b.get('port')}: {(b.get('error') or {}).get('message', b.get('status'))}"
             for b in failed]
    return "; ".join(texts) or result.get("message", "see the log")


# --- the gateway ---------------------------------------------------------------------------

@dataclass
class Gateway:
    child: Child
    metrics_port: int
    config: Path
    procs: Processes
    pole: PoleBroker
    monitor_secret: Path

    def metrics(self) -> str:
        return fetch_metrics(self.metrics_port)

    def reload(self) -> None:
        """What `systemctl reload citynode-gateway` does on a pole: the broker's accounts
        from the registry, mosquitto reloaded, and SIGHUP: the gateway re-reads it too."""
        write_accounts(self.procs, self.config, self.pole, self.monitor_secret)
        if self.child.proc.poll() is None:
            self.child.proc.send_signal(signal.SIGHUP)


def write_accounts(procs: Processes, config: Path, pole: PoleBroker, monitor_secret: Path
                   ) -> None:
    """`citynode-gateway broker-accounts` into the pole broker's password file, then reload."""
    child = procs.spawn("broker-accounts", tool("citynode-gateway", "citynode.gateway.cli") + [
        "broker-accounts", "--config", str(config), "--out", str(pole.passwd),
        "--new-gateway-secret", "--monitor-secret", str(monitor_secret)])
    if child.proc.wait(30) != 0:
        raise StepFailed("writing the pole broker's accounts", "citynode-gateway "
                         "broker-accounts failed", child.log)
    pole.reload()


def secret_file(path: Path) -> Path:
    """A fresh random secret in a 0600 file (programs read secrets from files, never argv)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(18) + "\n")
    return path


def gateway_config(workdir: Path, local: PoleBroker, upstream: Mosquitto, registry: Path,
                   metrics_port: int) -> str:
    """deploy/gateway.toml for one machine: no TLS, short backoff, no disk-space reserve."""
    def q(value: object) -> str:
        return json.dumps(str(value))  # a TOML basic string

    return f"""# written by `python -m citynode.demo`
[gateway]
id = {q(GATEWAY_ID)}
state_dir = {q(workdir / "gateway-state")}
registry_dir = {q(registry)}
operator_key = {q(operator_public(workdir))}
stall_exit_s = 60

[local]
host = {q(local.host)}
port = {local.port}
username = "citynode-gateway"
password_file = {q(workdir / "pole-broker.secret")}

[upstream]
host = {q(upstream.host)}
port = {upstream.port}
tls = false
topic_prefix = {q(TOPIC_PREFIX)}
backoff_min_s = 0.2
backoff_max_s = 1.0

[store]
min_free_bytes = 0
commit_ms = 50

[metrics]
address = "127.0.0.1:{metrics_port}"
"""


def start_gateway(procs: Processes, workdir: Path, local: PoleBroker, upstream: Mosquitto,
                  registry: Path, timeout: float = 30.0) -> Gateway:
    """The pole broker's accounts, then `citynode-gateway run`; returns once /health says
    the gateway is logged in to the pole broker."""
    registry.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = workdir / "gateway.toml"
    config.write_text(gateway_config(workdir, local, upstream, registry, port))
    monitor = secret_file(workdir / "pole-monitor.secret")
    write_accounts(procs, config, local, monitor)
    child = procs.spawn("gateway", tool("citynode-gateway", "citynode.gateway.cli") + [
        "run", "--config", str(config)])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise StepFailed("starting the gateway", f"citynode-gateway exited "
                             f"{child.proc.returncode}", child.log)
        health = fetch_health(port)
        if health and health.get("local") == "up":
            return Gateway(child, port, config, procs, local, monitor)
        time.sleep(0.1)
    raise StepFailed("starting the gateway", f"not healthy within {timeout:.0f} s", child.log)

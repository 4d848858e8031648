"""Real Mosquitto brokers for tests and the demo: one process per broker, on a free loopback port.

    broker = Mosquitto(tmp_path / "local", persistence=True)
    broker.start()          # returns once the port accepts connections
    broker.host, broker.port
    broker.stop()           # SIGTERM (mosquitto saves its persistence file)
    broker.kill()           # SIGKILL (what a power cut does to the process)
    broker.restart()        # stop (or after kill) and start again, same port and data
    broker.log()            # mosquitto's log, for assertion messages

`extra_config` is appended to the generated mosquitto.conf (e.g. a bridge);
`unlimited_queues=False` keeps Mosquitto's default queue limits (1000 queued);
`own_group=True` starts the broker in a process group of its own, so a Ctrl-C on the
terminal reaches only the program that started it (the demo stops its brokers itself).
The conftest fixtures `local_broker` and `upstream_broker` start one each, stopped
after the test. The binary is /usr/sbin/mosquitto, or $CITYNODE_MOSQUITTO.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from citynode.localserver import LocalServer

MOSQUITTO = os.environ.get("CITYNODE_MOSQUITTO") or shutil.which(
    "mosquitto", path="/usr/sbin:/usr/local/sbin:/usr/bin") or "/usr/sbin/mosquitto"


class MosquittoMissing(RuntimeError):
    """The mosquitto binary is not installed; the message says how to get it."""


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (never a fixed one like 1883:
    the machine may run a broker of its own)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_range(count: int, attempts: int = 50) -> int:
    """The first of `count` consecutive free loopback ports (`citynode-emu run --count`
    numbers its boards' RFC 2217 ports from one base)."""
    for _ in range(attempts):
        base = free_port()
        held: list[socket.socket] = []
        try:
            for offset in range(count):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free loopback ports found")


def mosquitto_binary() -> str:
    """The broker's path, or MosquittoMissing with the command that installs it."""
    if os.access(MOSQUITTO, os.X_OK):
        return MOSQUITTO
    raise MosquittoMissing(
        f"mosquitto not found (looked for {MOSQUITTO}); run `make setup`, or "
        "`sudo apt-get install mosquitto`, or set CITYNODE_MOSQUITTO to the binary")


class Mosquitto(LocalServer):
    def __init__(self, workdir: Path, *, persistence: bool = False, port: int | None = None,
                 extra_config: str = "", autosave_interval: int | None = None,
                 unlimited_queues: bool = True, own_group: bool = False,
                 bind: str = "127.0.0.1"):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"       # where clients on this machine connect
        self.bind = bind              # "0.0.0.0": also a real board on the bench network
        self.port = port or free_port()
        self.persistence = persistence
        self.extra_config = extra_config
        self.autosave_interval = autosave_interval
        self.unlimited_queues = unlimited_queues
        self.own_group = own_group
        self.proc: subprocess.Popen | None = None
        self.conf = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"

    def config_text(self) -> str:
        lines = [
            f"listener {self.port} {self.bind}",
            "allow_anonymous true",
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "log_type error", "log_type warning", "log_type notice",
            f"log_dest file {self.log_path}",
        ]
        if self.unlimited_queues:  # tests count every message; False keeps the defaults
            lines += ["max_queued_messages 0", "max_inflight_messages 100"]
        if self.autosave_interval is not None:
            lines.append(f"autosave_interval {self.autosave_interval}")
        return "\n".join(lines) + "\n" + self.extra_config + "\n"

    def _write_config(self) -> None:
        self.conf.write_text(self.config_text())

    def start(self, timeout: float = 10.0) -> Mosquitto:
        self._write_config()
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=self.own_group)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{self.log()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on {self.port}:\n{self.log()}")

    def restart(self) -> Mosquitto:
        self.stop()
        return self.start()

    def reload(self) -> None:
        """SIGHUP: Mosquitto reads its password and ACL files again."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGHUP)

    def __enter__(self) -> Mosquitto:
        return self.start() if not self.running else self


DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


class PoleBroker(Mosquitto):
    """The pole's broker as deploy/ ships it, for tests and the demo.

    deploy/mosquitto.conf and deploy/mosquitto.acl unchanged but for where things are: the
    gateway's loopback listener moves to `port`, the access point's listener (the nodes')
    to `node_port`, both on 127.0.0.1, and the files into `workdir`. `set_accounts(text)`
    writes the password file (citynode.pole_broker.password_file_text) and reloads it.
    """

    def __init__(self, workdir: Path, *, own_group: bool = False, deploy: Path = DEPLOY):
        super().__init__(workdir, persistence=True, own_group=own_group)
        self.node_port = free_port()
        self.deploy = deploy
        self.passwd = self.workdir / "passwd"
        self.acl = self.workdir / "acl"
        if not self.passwd.exists():
            self.passwd.write_text("")

    def config_text(self) -> str:
        try:
            text = (self.deploy / "mosquitto.conf").read_text()
            acl = (self.deploy / "mosquitto.acl").read_text()
        except OSError as exc:
            raise RuntimeError(f"the pole broker's shipped config is missing ({exc}); it is "
                               "in deploy/ of a citynode checkout") from None
        self.acl.write_text(acl)
        listeners = iter((self.port, self.node_port))
        lines = [f"user {pwd.getpwuid(os.getuid()).pw_name}",  # not root's drop to mosquitto
                 f"persistence_location {self.workdir}/"]       # Debian's main file's part
        for line in text.splitlines():
            if line.startswith("listener "):
                line = f"listener {next(listeners)} 127.0.0.1"
            line = line.replace("/etc/mosquitto/citynode/passwd", str(self.passwd))
            line = line.replace("/etc/mosquitto/citynode/acl", str(self.acl))
            line = line.replace("log_dest syslog", f"log_dest file {self.log_path}")
            lines.append(line)
        return "\n".join(lines) + "\n"

    def set_accounts(self, text: str) -> None:
        from citynode.pole_broker import write_password_file
        write_password_file(self.passwd, text, group=None)
        self.reload()

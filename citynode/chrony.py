"""The pole's time server for tests and the demo: a real chronyd with deploy/chrony.conf.

    server = PoleTimeServer(tmp_path / "chrony")
    server.start()          # returns once it answers an SNTP request
    server.host, server.port
    server.stop()

deploy/chrony.conf unchanged but for where things are: the nodes' network becomes
127.0.0.1, the NTP port a free one, and chronyd leaves this machine's clock alone
(-x): it serves the host's time, which is the truth the tests measure a node against.
The binary is /usr/sbin/chronyd (Debian's chrony), or $CITYNODE_CHRONYD.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

from citynode.localserver import LocalServer
from citynode.mosquitto import DEPLOY

CHRONYD = os.environ.get("CITYNODE_CHRONYD") or shutil.which(
    "chronyd", path="/usr/sbin:/usr/local/sbin:/usr/bin") or "/usr/sbin/chronyd"


class ChronyMissing(RuntimeError):
    """chronyd is not installed; the message says how to get it."""


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sntp_answer(host: str, port: int, timeout: float = 0.5) -> bytes | None:
    """One SNTP exchange: the server's 48-byte answer, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        request = bytes([0x23]) + bytes(39) + struct.pack(">Q", time.time_ns())
        try:
            sock.sendto(request, (host, port))
            answer = sock.recv(128)
        except OSError:
            return None
    return answer if len(answer) >= 48 and answer[24:32] == request[40:48] else None


class PoleTimeServer(LocalServer):
    def __init__(self, workdir: Path, *, own_group: bool = False, deploy: Path = DEPLOY):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_udp_port()
        self.deploy = deploy
        self.own_group = own_group
        self.conf = self.workdir / "chrony.conf"
        self.log_path = self.workdir / "chronyd.log"
        self.proc = None

    def config_text(self) -> str:
        try:
            text = (self.deploy / "chrony.conf").read_text()
        except OSError as exc:
            raise RuntimeError(f"the pole's shipped chrony.conf is missing ({exc}); it is in "
                               "deploy/ of a citynode checkout") from None
        lines = [f"port {self.port}", f"bindaddress {self.host}", "cmdport 0",
                 f"pidfile {self.workdir}/chronyd.pid", f"driftfile {self.workdir}/drift"]
        for line in text.splitlines():
            if line.startswith("allow "):
                line = f"allow {self.host}"
            lines.append(line)
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> PoleTimeServer:
        if not os.access(CHRONYD, os.X_OK):
            raise ChronyMissing(f"chronyd not found (looked for {CHRONYD}); run `make setup`, "
                                "or `sudo apt-get install chrony`, or set CITYNODE_CHRONYD")
        self.conf.write_text(self.config_text())
        user = ["-u", "root"] if os.geteuid() == 0 else []   # else chronyd drops to _chrony
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen([CHRONYD, "-x", "-d", "-f", str(self.conf), *user],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=self.own_group)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chronyd exited with {self.proc.returncode}:\n{self.log()}")
            if sntp_answer(self.host, self.port, 0.2) is not None:
                return self
        self.stop()
        raise RuntimeError(f"chronyd did not answer on UDP {self.port}:\n{self.log()}")

    def __enter__(self) -> PoleTimeServer:
        return self.start()

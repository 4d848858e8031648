"""The shipped gateway unit under a real systemd: PID 1 of a container that this host
boots with systemd-nspawn (issue 12). Opt-in: `make test-systemd`; `make test` leaves
this folder out (pyproject.toml, --ignore=tests/systemd).

Why opt-in: it needs root and a host whose kernel lets a container boot systemd
(namespaces, overlayfs, cgroups); many CI machines cannot. About 50 s here.

What it proves, one container and one install for the tests below, in file order:
1. `make install-gateway` without DESTDIR, as a technician runs it on a Pi (apt-get,
   pip from PyPI into /opt/citynode, systemctl enable and restart), succeeds;
2. the unit as shipped becomes active: Type=notify (active only after READY=1),
   DynamicUser=, LoadCredential=, StateDirectory= (/var/lib/citynode, the dynamic
   user's, 0700), and the hardening is in force in the daemon's own /proc entries;
3. a node's signed envelope, published with the node's own account through the locked
   pole broker (Debian's mosquitto.service with deploy/mosquitto.conf), reaches the
   city's broker (a Mosquitto on this host's loopback);
4. `systemctl reload citynode-gateway` gives a node registered since the start its
   broker account and the gateway its key, without a restart;
5. systemd's watchdog kills a frozen daemon (SIGSTOP) and restarts it;
6. a bad config (exit code 2) is not restarted;
7. the host is untouched: the container sees this host's /usr, /etc, /var, /opt and
   /root through overlays whose upper layers are temporary directories.

What differs from the shipped files, written here and nowhere else:
- /etc/mosquitto/conf.d/citynode.conf: the nodes' listener on 127.0.0.42, as a
  technician puts their access point's address there (10.42.0.1, the Pi's hotspot,
  does not exist on this host, and Mosquitto would not start);
- /etc/citynode/gateway.toml: the pole's id and the city's broker (this host's, no TLS);
  both are in place before the install, which keeps them (a technician may do the same);
- the drop-in citynode-gateway.service.d/test.conf: WatchdogSec=5 instead of 30, so
  the watchdog test waits 5 s for the kill.

The container shares the host's network (PyPI and Debian's mirror for the install, the
city's broker on loopback): 127.0.0.1:1883, 127.0.0.42:1883 (the pole broker) and
127.0.0.1:9108 (the gateway's metrics) must be free on the host.
Not covered: MemoryMax= (the container's cgroup controllers are read-only, so systemd
cannot enforce it), chrony (skipped in a container: nspawn withholds CAP_SYS_TIME, which
its unit requires), TLS to the city, a reboot, a Pi's NetworkManager hotspot.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from citynode import pole_broker, wire
from citynode.gateway.scrape import fetch_health
from citynode.mosquitto import Mosquitto
from citynode.registry import write_record
from citynode.testing.gateway import Collector
from citynode.testing.keys import TestDevice, seq_of

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = "citynode-gateway.service"
UNIT_FILE = f"/etc/systemd/system/{UNIT}"
DROP_IN = f"/etc/systemd/system/{UNIT}.d/test.conf"
CONFIG = "/etc/citynode/gateway.toml"
REGISTRY = "/etc/citynode/registry"
GATEWAY_ID = "pole-systemd-test"
PREFIX = "city/citynode"              # the shipped gateway.toml's topic_prefix
NODE_ADDRESS = "127.0.0.42"           # stands in for the access point's 10.42.0.1
BROKER_PORT = 1883                    # deploy/mosquitto.conf's, on both listeners
METRICS_PORT = 9108                   # deploy/gateway.toml's [metrics] address
WATCHDOG_S = 5                        # the drop-in's WatchdogSec (the unit ships 30)
RESTART_S = 2                         # the unit's RestartSec
DYNAMIC_UIDS = range(61184, 65520)    # where systemd picks DynamicUser= ids
HOST_DIRS = ("usr", "etc", "var", "opt", "root")   # overlaid, so the container may write
# a clean root shell, as `sudo` gives a technician (pip reads root's and /etc's config)
SHELL_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "HOME=/root", "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0")
# Units of this host that the container must not start (systemd.mask= on its command line)
MASKED = (
    "postgresql.service",            # a second PostgreSQL on the host's network
    "apt-daily.timer",               # apt in the background holds the lock the
    "apt-daily-upgrade.timer",       # install's apt-get needs
    "man-db.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",  # no use here
)
# The host's paths that the install writes on a Pi: the same after the run (recursive:
# every entry with its mtime; otherwise the names in the folder)
WATCHED = {"/etc/systemd/system": True, "/etc/mosquitto": True, "/etc/citynode": True,
           "/etc/chrony": True, "/opt": False, "/usr/local/bin": False,
           "/usr/share/doc": False, "/var/lib": False}
# the whole module: one boot and one install from PyPI
pytestmark = pytest.mark.timeout(900)


def host_state() -> dict[str, list[tuple[str, int]]]:
    """What WATCHED holds now on the host, to compare after the run."""
    state: dict[str, list[tuple[str, int]]] = {}
    for top, recursive in WATCHED.items():
        entries: list[tuple[str, int]] = []
        if recursive:
            for folder, dirs, files in os.walk(top):
                for name in dirs + files:
                    path = os.path.join(folder, name)
                    entries.append((os.path.relpath(path, top), os.lstat(path).st_mtime_ns))
        elif os.path.isdir(top):
            entries = [(name, 0) for name in os.listdir(top)]
        state[top] = sorted(entries)
    return state


def copy_checkout(dest: Path) -> None:
    """This checkout as it is (HEAD with the working tree's changes and new files, less
    what .gitignore leaves out): pip builds in the source folder, never in the live one."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    for name in filter(None, names):
        source, target = ROOT / os.fsdecode(name), dest / os.fsdecode(name)
        if not os.path.lexists(source) or os.path.lexists(target):
            continue                          # deleted in the working tree, or listed twice
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
        elif source.is_file():
            shutil.copy2(source, target)


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def edit(text: str, old: str, new: str) -> str:
    """One technician's edit of a shipped file; fails loudly when the file changed."""
    assert text.count(old) == 1, f"expected {old!r} once in the shipped file"
    return text.replace(old, new)


def wait_until(check: Callable[[], object], timeout: float, what: str,
               details: Callable[[], str] = lambda: "") -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n"
                                 f"{details()}")
        time.sleep(0.2)


class Container:
    """A throwaway machine: this host's OS under a real systemd as PID 1, booted by
    systemd-nspawn with the host's /usr, /etc, /var, /opt, /root as overlays (writes go
    to `workdir`/upper, the host's files stay as they are) and `source` at /src."""

    def __init__(self, workdir: Path, source: Path):
        self.workdir, self.source = workdir, source
        self.machine = f"citynode-test-{os.getpid()}"
        self.boot_log = workdir / "boot.log"
        self.proc: subprocess.Popen | None = None
        self.init = 0

    def boot(self, timeout: float = 90) -> None:
        root, upper = self.workdir / "root", self.workdir / "upper"
        for name in ("proc", "sys", "dev", "run", "tmp", "home", "srv", "mnt", "media",
                     "boot", *HOST_DIRS):
            (root / name).mkdir(parents=True, exist_ok=True)
        for name in ("bin", "sbin", "lib", "lib64"):   # Debian 12: merged /usr
            (root / name).symlink_to(f"usr/{name}")
        # nspawn looks for an OS tree before it mounts the overlays (which hide this copy)
        (root / "usr/lib").mkdir(parents=True)
        shutil.copy("/usr/lib/os-release", root / "usr/lib/os-release")
        overlays = []
        for name in HOST_DIRS:
            (upper / name).mkdir(parents=True)
            overlays.append(f"--overlay=/{name}:{upper / name}:/{name}")
        command = ["systemd-nspawn", "--quiet", f"--directory={root}",
                   f"--machine={self.machine}",
                   "--register=no", "--keep-unit",     # the host has no systemd, no machined
                   "--console=read-only", *overlays, f"--bind={self.source}:/src",
                   "--boot", "systemd.firstboot=off", "systemd.unit=multi-user.target",
                   *(f"systemd.mask={unit}" for unit in MASKED)]
        with self.boot_log.open("wb") as log:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.init = int(wait_until(self._find_init, 20, "the container's systemd",
                                   self.boot_tail))
        state = wait_until(self._booted, timeout, "the container's boot", self.boot_tail)
        assert state == "running", (f"the container booted {state}: "
                                    f"{self.run('systemctl', '--failed', check=False).stdout}"
                                    f"(mask what cannot run here in MASKED)\n{self.boot_tail()}")

    def _find_init(self) -> int:
        """The container's PID 1 as the host sees it: nspawn's child, once it is systemd."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited {self.proc.returncode}:\n"
                               f"{self.boot_tail()}")
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat.split(")")[-1]
            if int(fields.split()[1]) == self.proc.pid and comm == "systemd":
                return int(entry.name)
        return 0

    def _booted(self) -> str:
        run = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=30)
        state = run.stdout.strip()
        return state if state in ("running", "degraded") else ""

    def boot_tail(self) -> str:
        try:
            return self.boot_log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def run(self, *command: str, input: str | None = None, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`command` as root inside the container, in a clean environment."""
        run = subprocess.run(["nsenter", f"--target={self.init}", "--all", "env", "-i",
                              *SHELL_ENV, *command], input=input, capture_output=True,
                             text=True, timeout=timeout)
        if check and run.returncode != 0:
            raise AssertionError(f"{' '.join(command)} exited {run.returncode}:\n"
                                 f"{run.stdout}{run.stderr}\n{self.diagnose()}")
        return run

    def sh(self, script: str, **kwargs) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-ec", script, **kwargs)

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.run("sh", "-ec", 'mkdir -p "$(dirname "$1")"; cat > "$1"; chmod "$2" "$1"',
                 "sh", path, mode, input=text)

    def read(self, path: str) -> str:
        return self.run("cat", path).stdout

    def show(self, *props: str, unit: str = UNIT) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def cursor(self) -> str:
        """The journal's position now: what is logged after it is what a step caused."""
        out = self.run("journalctl", "--quiet", "--lines=1", "--output=json").stdout
        return json.loads(out.splitlines()[-1])["__CURSOR"]

    def journal(self, after: str, *units: str) -> str:
        return self.run("journalctl", "--no-pager", f"--after-cursor={after}",
                        *(f"--unit={u}" for u in units)).stdout

    def diagnose(self) -> str:
        """systemctl status and the journal of the gateway and its broker, for a failure."""
        try:
            status = subprocess.run(
                ["nsenter", f"--target={self.init}", "--all", "env", "-i", *SHELL_ENV,
                 "sh", "-c", f"systemctl status --no-pager --full {UNIT} mosquitto.service;"
                 f" journalctl --no-pager --lines=60 --unit={UNIT} --unit=mosquitto.service"],
                capture_output=True, text=True, timeout=30)
            text = status.stdout + status.stderr
        except (OSError, subprocess.SubprocessError) as exc:
            text = f"(no status from the container: {exc})"
        return "--- systemctl status / journalctl in the container:\n" + text[-8000:]

    def poweroff(self) -> None:
        """A clean shutdown (SIGRTMIN+4 to systemd: poweroff); killed if it hangs."""
        if self.proc is None:
            return
        if self.init and self.proc.poll() is None:
            os.kill(self.init, signal.SIGRTMIN + 4)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.init, signal.SIGKILL)   # the container's PID namespace with it
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        # nspawn's own bookkeeping for this machine, if it left it (the host's /run is disk)
        shutil.rmtree(Path("/run/systemd/nspawn/propagate") / self.machine,
                      ignore_errors=True)


class NodeLink:
    """A node's MQTT session on the pole broker's access-point listener, logged in with
    its own account (user = device id, its broker secret), as the firmware does."""

    def __init__(self, device: TestDevice, secret: str):
        self.device = device
        self.answered = threading.Event()
        self.reason: object = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device.device_id,
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(device.device_id, secret)
        self.client.on_connect = self._connected

    def _connected(self, client, userdata, flags, reason, properties) -> None:
        self.reason = reason
        self.answered.set()

    def connect(self, timeout: float = 10) -> bool:
        """Whether the broker let it in; a refused node is disconnected again."""
        self.client.connect(NODE_ADDRESS, BROKER_PORT)
        self.client.loop_start()
        assert self.answered.wait(timeout), "no CONNACK from the pole broker"
        accepted = not self.reason.is_failure
        if not accepted:
            self.close()
        return accepted

    def publish(self, count: int) -> list[tuple[str, int]]:
        """`count` signed envelopes at QoS 1; their (device, seq)."""
        sent = [self.device.envelope() for _ in range(count)]
        for envelope in sent:
            self.client.publish(wire.up_topic(self.device.device_id), envelope,
                                qos=1).wait_for_publish(10)
        return [seq_of(envelope) for envelope in sent]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Pole:
    """The booted container with the gateway installed, and the city's side on the host."""

    container: Container
    upstream: Mosquitto
    collector: Collector
    install: subprocess.CompletedProcess[str]
    host_before: dict[str, list[tuple[str, int]]]
    nodes: list[tuple[TestDevice, str]]
    links: list[NodeLink] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def installed(self) -> Container:
        if self.install.returncode != 0:
            pytest.fail("`make install-gateway` failed in the container (first test)")
        return self.container

    def link(self, index: int) -> NodeLink:
        device, secret = self.nodes[index]
        link = NodeLink(device, secret)
        self.links.append(link)
        return link

    def wait_upstream(self, keys: list[tuple[str, int]], timeout: float = 30) -> None:
        """Until the city's broker has every one of `keys`, each once."""
        wait_until(lambda: set(keys) <= set(self.collector.keys()), timeout,
                   f"{len(keys)} envelope(s) at the city's broker", self.container.diagnose)
        got = self.collector.keys()
        assert all(got.count(key) == 1 for key in keys), got



def register(box: Container, device: TestDevice, secret: str) -> None:
    """Provisioning's record of a node (public key, broker password hash) in the pole's
    registry: written on the host as citynode-provision writes it, then copied over."""
    with tempfile.TemporaryDirectory() as folder:
        path = write_record(folder, replace(device.record(),
                                            broker_hash=pole_broker.hash_secret(secret)))
        box.write(f"{REGISTRY}/{path.name}", path.read_text())


def technician_config(upstream_port: int) -> tuple[str, str]:
    """The shipped gateway.toml and mosquitto.conf with a technician's edits."""
    config = (DEPLOY / "gateway.toml").read_text()
    config = edit(config, 'id = "pole-0042"', f'id = "{GATEWAY_ID}"')
    config = edit(config, 'host = "mqtt.city.example"', 'host = "127.0.0.1"')
    config = edit(config, "port = 8883", f"port = {upstream_port}")
    config = edit(config, "tls = true", "tls = false")
    broker = edit((DEPLOY / "mosquitto.conf").read_text(), "listener 1883 10.42.0.1",
                  f"listener {BROKER_PORT} {NODE_ADDRESS}")
    return config, broker


def say(config: pytest.Config, line: str) -> None:
    """A line on the terminal, past pytest's capture."""
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        print(line)


@pytest.fixture(scope="module")
def pole(request: pytest.FixtureRequest) -> Iterator[Pole]:
    """Boot the container, stage a technician's edits, run `make install-gateway` in it;
    everything is taken down afterwards, whatever happened."""
    started = time.monotonic()
    if os.geteuid() != 0:
        pytest.fail("systemd-nspawn needs root: sudo make test-systemd")
    for tool in ("systemd-nspawn", "nsenter"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} missing: make test-systemd installs systemd-container")
    for host, port in (("127.0.0.1", BROKER_PORT), (NODE_ADDRESS, BROKER_PORT),
                       ("127.0.0.1", METRICS_PORT)):
        if not port_free(host, port):
            pytest.fail(f"{host}:{port} is in use on this host; the container shares its "
                        "network and its pole broker and gateway listen there")
    host_before = host_state()
    workdir = Path(tempfile.mkdtemp(prefix="citynode-systemd-"))
    container = Container(workdir, workdir / "src")
    upstream = Mosquitto(workdir / "city", persistence=True)
    collector: Collector | None = None
    result: Pole | None = None
    try:
        copy_checkout(container.source)
        upstream.start()
        collector = Collector(upstream, topic=f"{PREFIX}/#")
        container.boot()
        booted = time.monotonic()
        config, broker = technician_config(upstream.port)
        container.write(CONFIG, config)
        container.write("/etc/mosquitto/conf.d/citynode.conf", broker)
        nodes = [(TestDevice.random(), pole_broker.new_secret()) for _ in range(2)]
        register(container, *nodes[0])    # provisioned before the pole was set up
        install = container.sh("cd /src && make install-gateway PYTHON=/usr/bin/python3",
                               check=False, timeout=600)
        result = Pole(container, upstream, collector, install, host_before, nodes)
        result.timings = {"boot": booted - started, "install": time.monotonic() - booted}
        yield result
    finally:
        for link in result.links if result else []:
            link.close()
        if collector is not None:
            collector.close()
        upstream.stop()
        container.poweroff()
        mounted = [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
                   if str(workdir) in line]
        if not mounted:     # the overlays lived in nspawn's mount namespace only
            shutil.rmtree(workdir, ignore_errors=True)
        timings = result.timings if result else {}
        line = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
        summary = (f"\ntest-systemd: {line}{', ' if line else ''}all "
                   f"{time.monotonic() - started:.0f} s"
                   + (f"; {workdir} left: still mounted" if mounted else ""))
        request.config.add_cleanup(lambda: say(request.config, summary))  # the last line


def test_make_install_gateway_succeeds_as_on_a_pi(pole: Pole) -> None:
    box = pole.container
    out = pole.install.stdout + pole.install.stderr
    assert pole.install.returncode == 0, f"{out}\n{box.diagnose()}"
    assert "install-gateway: running" in pole.install.stdout, f"{out}\n{box.diagnose()}"
    # the unit and the program where the script put them, both services enabled
    assert box.read(UNIT_FILE) == (DEPLOY / "citynode-gateway.service").read_text()
    assert box.run("readlink", "/usr/local/bin/citynode-gateway").stdout.strip() == (
        "/opt/citynode/bin/citynode-gateway")
    for unit in (UNIT, "mosquitto.service"):
        state = box.show("UnitFileState", "ActiveState", unit=unit)
        assert state == {"UnitFileState": "enabled", "ActiveState": "active"}, (
            f"{unit}: {state}\n{box.diagnose()}")
    # the technician's edits kept
    assert box.read(CONFIG) == technician_config(pole.upstream.port)[0]
    # chrony is installed but must not run here: it would query Debian's NTP pool
    assert box.show("ConditionResult", unit="chrony.service")["ConditionResult"] == "no"


def test_the_shipped_unit_runs_under_systemd(pole: Pole) -> None:
    box = pole.installed()
    show = box.show("ActiveState", "SubState", "Type", "NotifyAccess", "DynamicUser",
                    "FragmentPath", "DropInPaths", "WatchdogUSec", "NRestarts", "MainPID",
                    "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    assert (show["ActiveState"], show["SubState"]) == ("active", "running"), box.diagnose()
    assert show["FragmentPath"] == UNIT_FILE and not show["DropInPaths"], show
    assert (show["Type"], show["NotifyAccess"], show["DynamicUser"]) == (
        "notify", "main", "yes"), show
    # Type=notify: active at READY=1, after the process started (simple: at the start)
    assert int(show["ActiveEnterTimestampMonotonic"]) > int(
        show["ExecMainStartTimestampMonotonic"]), show
    assert show["WatchdogUSec"] == "30s" and show["NRestarts"] == "0", (
        f"{show}\n{box.diagnose()}")
    pid = show["MainPID"]
    cmdline = box.read(f"/proc/{pid}/cmdline").split("\0")
    assert cmdline[1:] == ["/usr/local/bin/citynode-gateway", "run", "--config", CONFIG,
                           ""], cmdline
    # DynamicUser= and the hardening, as the kernel holds them for the daemon
    status = dict(line.split(":\t", 1) for line in box.read(f"/proc/{pid}/status")
                  .splitlines() if ":\t" in line)
    uid = int(status["Uid"].split()[0])
    assert uid in DYNAMIC_UIDS, status["Uid"]
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0, status
    mounts = {fields[4]: (fields[3], fields[5].split(",")) for fields in
              (line.split() for line in box.read(f"/proc/{pid}/mountinfo").splitlines())}
    assert "ro" in mounts["/"][1], mounts["/"]                       # ProtectSystem=strict
    assert "rw" in mounts["/var/lib/private/citynode"][1], mounts    # StateDirectory=
    assert "/systemd-private-" in mounts["/tmp"][0], mounts["/tmp"]  # PrivateTmp=
    # LoadCredential=: the 0600 secret handed over, readable by the dynamic user only
    credential = f"/run/credentials/{UNIT}/pole-broker.secret"
    assert box.run("stat", "-c", "%u %a", credential).stdout.split() == [str(uid), "400"]
    box.run("cmp", credential, "/etc/citynode/pole-broker.secret")
    # StateDirectory=: /var/lib/citynode, the dynamic user's, 0700, and what it wrote
    assert box.run("readlink", "/var/lib/citynode").stdout.strip() == "private/citynode"
    assert box.run("stat", "-c", "%u %a", "/var/lib/private/citynode").stdout.split() == [
        str(uid), "700"]
    wait_until(lambda: box.run("test", "-e", "/var/lib/citynode/status.json",
                               check=False).returncode == 0, 10, "status.json", box.diagnose)
    files = box.run("find", "/var/lib/private/citynode", "-mindepth", "1", "-printf",
                    "%f %U %m\n").stdout.split("\n")
    written = {name: (owner, mode) for name, owner, mode in
               (line.split() for line in files if line)}
    assert {"gateway.db", "status.json"} <= set(written), written
    for name, (owner, mode) in written.items():
        assert owner == str(uid) and int(mode, 8) & 0o077 == 0, (name, owner, mode)

    # logged in to the pole broker (with the credential) and to the city's
    def both_up() -> dict | None:
        health = fetch_health(METRICS_PORT)
        return health if health and health.get("local") == health.get("uplink") == "up" else None

    health = wait_until(both_up, 20, "/health: local and uplink up", box.diagnose)
    assert health["gateway"] == GATEWAY_ID, health


def test_a_node_envelope_reaches_the_city(pole: Pole) -> None:
    box = pole.installed()
    device, _ = pole.nodes[0]                 # in the registry since the install
    # the locked broker: another password for the same node is refused
    impostor = NodeLink(device, pole_broker.new_secret())
    assert not impostor.connect(), f"the pole broker let in a wrong password\n{box.diagnose()}"
    node = pole.link(0)
    assert node.connect(), f"the pole broker refused the node: {node.reason}\n{box.diagnose()}"
    sent = node.publish(3)
    pole.wait_upstream(sent)
    topics = {topic for topic, _, _ in pole.collector.envelopes()}
    assert topics == {f"{PREFIX}/{GATEWAY_ID}/up/{device.device_id}"}, topics


def test_systemctl_reload_gives_a_new_node_its_account_and_key(pole: Pole) -> None:
    box = pole.installed()
    before = box.show("MainPID", "NRestarts")
    register(box, *pole.nodes[1])             # provisioned while the gateway runs
    late = pole.link(1)
    assert not late.connect(), f"the broker let in a node with no account\n{box.diagnose()}"
    cursor = box.cursor()
    box.run("systemctl", "reload", UNIT)
    # ExecReload=: the accounts (as root), mosquitto's reload, SIGHUP to the daemon
    log = box.journal(cursor, UNIT, "mosquitto.service")
    assert "2 node account(s)" in log, f"{log}\n{box.diagnose()}"
    assert "Reloaded mosquitto.service" in log, f"{log}\n{box.diagnose()}"
    wait_until(lambda: "registry /etc/citynode/registry: 2 devices" in box.journal(
        cursor, UNIT), 10, "the daemon's registry reload (SIGHUP)", box.diagnose)
    assert box.show("MainPID", "NRestarts") == before, box.diagnose()   # not a restart
    node = pole.link(1)
    assert node.connect(), f"refused after the reload: {node.reason}\n{box.diagnose()}"
    pole.wait_upstream(node.publish(2))


def test_the_watchdog_restarts_a_frozen_daemon(pole: Pole) -> None:
    box = pole.installed()
    box.write(DROP_IN, "# Written by tests/systemd/test_unit_under_systemd.py, the only change\n"
              "# to the shipped unit: its WatchdogSec=30 would make the test wait 30 s.\n"
              f"[Service]\nWatchdogSec={WATCHDOG_S}\n")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "restart", UNIT)
    show = box.show("MainPID", "NRestarts", "WatchdogUSec", "WatchdogTimestampMonotonic")
    assert show["WatchdogUSec"] == f"{WATCHDOG_S}s", f"{show}\n{box.diagnose()}"
    pid, restarts = show["MainPID"], int(show["NRestarts"])
    # alive: its pings reach systemd, and it outlives a watchdog interval
    time.sleep(WATCHDOG_S + 1)
    alive = box.show("MainPID", "NRestarts", "WatchdogTimestampMonotonic")
    assert (alive["MainPID"], int(alive["NRestarts"])) == (pid, restarts), box.diagnose()
    assert alive["WatchdogTimestampMonotonic"] != show["WatchdogTimestampMonotonic"], (
        f"no WATCHDOG=1 from the daemon: {alive}\n{box.diagnose()}")
    cursor, frozen = box.cursor(), time.monotonic()
    box.run("kill", "-STOP", pid)
    results: set[str] = set()

    def restarted() -> bool:
        now = box.show("ActiveState", "MainPID", "NRestarts", "Result")
        results.add(now["Result"])
        return (int(now["NRestarts"]) > restarts and now["ActiveState"] == "active"
                and now["MainPID"] not in ("0", pid))

    wait_until(restarted, WATCHDOG_S + RESTART_S + 30, "the watchdog's restart", box.diagnose)
    took = time.monotonic() - frozen
    log = box.journal(cursor, UNIT)
    assert "Watchdog timeout" in log and "Failed with result 'watchdog'" in log, log
    assert "watchdog" in results, f"Result= seen: {results}\n{log}"   # until the restart
    assert took >= WATCHDOG_S - 1, f"restarted {took:.1f} s after the freeze: not the watchdog"
    # the new process serves the node again (its session on the pole broker kept)
    pole.wait_upstream(pole.links[-1].publish(1))


def test_a_bad_config_is_not_restarted(pole: Pole) -> None:
    box = pole.installed()
    good = box.read(CONFIG)
    box.write(CONFIG, edit(good, f'id = "{GATEWAY_ID}"', f'id = "{GATEWAY_ID}'))  # a typo
    start = box.run("systemctl", "restart", UNIT, check=False)
    assert start.returncode != 0, box.diagnose()
    time.sleep(3 * RESTART_S)                     # a restart would have come by now
    show = box.show("ActiveState", "NRestarts", "ExecMainStatus")
    # NRestarts: systemd's own restarts since this start by hand (which counts from 0)
    assert show == {"ActiveState": "failed", "NRestarts": "0", "ExecMainStatus": "2"}, (
        f"{show}\n{box.diagnose()}")
    # fixed, then started by hand: it runs again
    box.write(CONFIG, good)
    box.run("systemctl", "restart", UNIT)
    assert box.show("ActiveState")["ActiveState"] == "active", box.diagnose()


def test_the_host_is_untouched(pole: Pole) -> None:
    # the container's writes went to the overlays' upper layers, not to this host
    upper = pole.container.workdir / "upper"
    assert (upper / UNIT_FILE.lstrip("/")).is_file()
    assert (upper / "opt/citynode/bin/citynode-gateway").exists()
    after = host_state()
    changed = {top: sorted(set(after[top]) ^ set(entries))
               for top, entries in pole.host_before.items() if after[top] != entries}
    assert not changed, changed

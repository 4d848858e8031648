"""The whole path for one or many boards: flash, deploy, keys, register, verify, receipt, label.

Each step first looks at what the board and the registry already hold and skips
what is done, so `provision` is idempotent (a re-run changes nothing and says so)
and resumable (a run cut by a power loss or a pulled cable continues where it
stopped). Boards run in parallel threads; each reports through its own events.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from citynode import registry as reg
from citynode import wire
from citynode.boards import Board

from . import deploy, flash, fleet, keys, labels, ports, receipts, verify
from .device import Session
from .errors import DeviceError, NoMicroPython, ProvisionError, UsageError
from .events import Events, PortEvents

IMAGE_STATE = "/image.json"


@dataclass
class Options:
    board: Board
    registry: Path
    site: str
    pole: str
    lat: float = 0.0
    lon: float = 0.0
    broker: str = "192.168.4.1:1883"
    ntp: str | None = None          # HOST:PORT; None: the broker's host, port 123
    height_m: float | None = None   # mounting height, for the registry
    wifi_ssid: str = ""
    wifi_password: str | None = None  # None: leave the node's secret as it is
    image: flash.Image | None = None
    force_flash: bool = False
    firmware_dir: Path | None = None
    use_mpy: bool | None = None
    alg: str = "ES256"
    window_s: int = 60
    healthy_s: int = deploy.HEALTHY_S
    operator_key: bytes | None = None
    force_rekey: bool = False
    labels_dir: Path | None = None
    technician: str = ""
    timeout: float = 10.0


@dataclass
class BoardResult:
    port: str
    status: str = "failed"  # provisioned | unchanged | failed
    device: str = ""
    mac: str = ""
    steps: dict[str, str] = field(default_factory=dict)
    error: dict[str, str] | None = None
    exit_code: int = 0
    seconds: float = 0.0
    receipt: str = ""
    labels: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if v not in (None, "", [], {})}
        out["seconds"] = round(self.seconds, 2)
        return out


def open_session(port: str, timeout: float, serial_number: str | None = None,
                 wait: float = 0.0) -> Session:
    """Open a raw-REPL session, re-finding a re-enumerated USB port by serial number.

    After a reset the board needs a moment to boot; `wait` retries until then.
    """
    deadline = time.monotonic() + wait
    while True:
        current = (ports.find_by_serial(serial_number) if serial_number else None) or port
        try:
            return Session(current, timeout=timeout)
        except NoMicroPython:
            raise
        except ProvisionError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def provision_one(opts: Options, port: str, ev: PortEvents) -> BoardResult:
    result = BoardResult(port)
    started = time.monotonic()
    try:
        _provision(opts, port, ev, result)
    except ProvisionError as exc:
        result.status = "failed"
        result.error = exc.to_dict()
        result.exit_code = exc.exit_code
        ev.failed("error", str(exc), error=exc.kind)
    except Exception as exc:  # one board's surprise must not sink the other boards' summary
        result.status = "failed"
        result.error = {"error": "internal", "message": f"{type(exc).__name__}: {exc}",
                        "fix": "re-run; if it repeats, report it with this message"}
        result.exit_code = 1
        ev.failed("error", result.error["message"], error="internal")
    result.seconds = time.monotonic() - started
    return result


def _provision(opts: Options, port: str, ev: PortEvents, result: BoardResult) -> None:
    ports.check_port(port)
    fleet.ensure_writable(opts.registry)
    fw = opts.firmware_dir or deploy.firmware_dir()
    usb = ports.describe(port).serial_number
    changed = False

    # 1. what is on the board; flash if it has no MicroPython or another image
    ev.start("detect", "connecting")
    probe: dict[str, Any] | None = None
    session: Session | None = None
    try:
        session = open_session(port, opts.timeout, usb)
        probe = session.probe()
    except NoMicroPython as exc:
        if opts.image is None:
            raise
        ev.info("detect", exc.message)
    except BaseException:
        if session is not None:
            session.close()
        raise
    recorded = (probe or {}).get("image") or {}
    if probe is not None:
        ev.done("detect", f"MicroPython {'.'.join(map(str, probe['micropython']))}, "
                f"MAC {probe.get('mac')}")
    need_flash = opts.image is not None and (
        probe is None or opts.force_flash or recorded.get("sha256") != opts.image.sha256)
    if need_flash:
        assert opts.image is not None
        if session is not None:
            session.close()  # esptool needs the port
            session = None
        info = flash.flash(port, opts.board, opts.image, ev)
        result.steps["flash"] = "flashed"
        changed = True
        result.mac = info.mac
    else:
        result.steps["flash"] = "kept"
        ev.skipped("flash", "image already on the board" if opts.image else
                   "no image given; keeping the board's MicroPython")

    if session is None:  # after flashing: the board boots MicroPython, give it time
        session = open_session(port, opts.timeout, usb, wait=15)
    with session as s:
        if need_flash or probe is None:
            probe = s.probe()
        if not probe.get("mac"):
            raise DeviceError(f"the board on {port} did not report its MAC "
                              f"({probe.get('mac_error')})", "re-flash MicroPython")
        result.mac = probe["mac"]
        device = wire.device_id(probe["mac"])
        result.device = device
        deploy.check_micropython(fw, probe)
        if need_flash:
            s.write_file(IMAGE_STATE, json.dumps({"sha256": opts.image.sha256,
                                                  "name": opts.image.path.name}).encode())

        # 2. firmware and config
        plan = deploy.build_plan(fw, probe, opts.use_mpy)
        cfg = deploy.build_config(opts.board, device, opts.site, opts.pole, opts.lat, opts.lon,
                                  opts.broker, opts.wifi_ssid, opts.alg, opts.window_s,
                                  opts.ntp, opts.height_m, opts.healthy_s)
        plan.extra[deploy.CONFIG_PATH] = deploy.config_bytes(cfg)
        if opts.wifi_password is not None:
            plan.extra[deploy.WIFI_SECRET_PATH] = deploy.secret_bytes(opts.wifi_password)
        else:
            ev.info("deploy", "no Wi-Fi password given: the node's stored one is kept")
        registered = fleet.read(opts.registry, device)
        login = keys.broker_login(s, registered.broker_hash if registered else None)
        if login.new_secret is not None:
            plan.extra[deploy.BROKER_SECRET_PATH] = deploy.secret_bytes(login.new_secret)
        dep = deploy.apply(s, plan, ev)
        result.steps["deploy"] = (f"{len(dep.written)} written" if dep.changed else "unchanged")
        changed |= dep.changed

        # 3. key on the node, registry entry
        ev.start("keys", "asking the node for its public key")
        key = keys.ensure_key(s)
        result.steps["keys"] = "created" if key.created else "existing"
        changed |= key.created
        ev.done("keys", ("generated on the node" if key.created else "already on the node")
                + f", fingerprint {key.fingerprint[:16]}")
        if opts.operator_key is not None:
            if keys.install_operator_key(s, opts.operator_key):
                changed = True
                ev.done("keys", "operator key installed")
        firmware_version = deploy.firmware_version(fw)
        record = reg.DeviceRecord(device_id=device, alg="ES256", board=opts.board.name,
                                  site=opts.site, pole=opts.pole, lat=opts.lat, lon=opts.lon,
                                  height_m=opts.height_m,
                                  firmware=firmware_version, public_key_pem=key.pem,
                                  broker_hash=login.hash)
        _, how = fleet.register(opts.registry, record, opts.force_rekey)
        result.steps["registry"] = how
        changed |= how != "unchanged"
        (ev.skipped if how == "unchanged" else ev.done)(
            "register", f"{device} {how} in {opts.registry}")

        # 4. proof: the self-test envelope verifies with the registry key
        ev.start("verify", "running the self-test on the node")
        checked = verify.verify(s, opts.registry, device)
        result.steps["verify"] = "ok"
        ev.done("verify", f"envelope seq {checked.seq} verified; sensors: "
                + ", ".join(f"{n} {v.get('status')}" for n, v in checked.sensors.items()),
                sensors=checked.sensors)

        # 5. receipt signed by the node, label, state on the node
        state = {"device": device, "files_sha256": dep.firmware_hash,
                 "key_fingerprint": key.fingerprint,
                 "image_sha256": (probe.get("image") or {}).get("sha256")
                 or (opts.image.sha256 if need_flash and opts.image else None)}
        on_board = probe.get("provisioned") or {}
        if changed or {k: on_board.get(k) for k in state} != state or not _receipts(opts, device):
            claims = {"device": device, "board": opts.board.name, "site": opts.site,
                      "pole": opts.pole, "image_sha256": state["image_sha256"],
                      "firmware": firmware_version, "time": reg.now_iso(),
                      "technician": opts.technician or receipts.technician()}
            rec = receipts.sign_on_node(s, plan.attested, claims)
            signed = receipts.check(rec, opts.registry)
            if signed.get("device") != device or signed.get("mac") != probe["mac"]:
                raise DeviceError(f"the receipt names {signed.get('device')} / MAC "
                                  f"{signed.get('mac')}, not {device}",
                                  "re-run provision with only this board connected")
            if signed.get("files_sha256") != dep.firmware_hash:
                raise DeviceError("the node's hash of its files differs from what was deployed",
                                  "re-run provision; the filesystem may be damaged")
            path = receipts.save(rec, opts.registry, signed)
            result.receipt = str(path)
            ev.done("receipt", f"signed by the node: {path.name}")
            s.write_file(deploy.STATE_PATH,
                         json.dumps({**state, "provisioned_at": claims["time"]}).encode())
            changed = True
        else:
            ev.skipped("receipt", "receipt and node state already current")
        label_dir = opts.labels_dir or opts.registry / "labels"
        if changed or not (label_dir / f"{device}.svg").exists():
            result.labels = [str(p) for p in labels.make_label(label_dir, device, opts.pole,
                                                               opts.site)]
            ev.done("label", f"{device}: {', '.join(Path(p).name for p in result.labels)}")
        s.reset()  # start the node's app (the session stopped it)
    result.status = "provisioned" if changed else "unchanged"
    if changed:
        ev.done("done", f"{device} provisioned")
    else:
        ev.done("done", f"{device} was already provisioned: nothing changed")


def _receipts(opts: Options, device: str) -> list[Path]:
    return sorted((opts.registry / "receipts").glob(f"{device}-*.json"))


def provision_many(opts: Options, port_list: list[str], events: Events) -> list[BoardResult]:
    """All boards in parallel, one thread each (esptool and the REPL mostly wait on I/O)."""
    if not port_list:
        raise UsageError("no board to provision", "pass --port (repeatable) or --all")
    if len(set(port_list)) != len(port_list):
        raise UsageError("the same port is given twice", "pass each board once")
    with ThreadPoolExecutor(max_workers=len(port_list)) as pool:
        futures = [pool.submit(provision_one, opts, p, events.for_port(p)) for p in port_list]
        return [f.result() for f in futures]

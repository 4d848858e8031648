"""`make demo` as CI runs it: real brokers, blank emulated boards, real provisioning, the
real gateway. The headless run must account for every reading; Ctrl-C must leave no
process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"demo: produced (\d+), forwarded (\d+), verified upstream (\d+), "
                     r"rejected (\d+)(?: \(([^)]*)\))?, lost (\d+)")


def demo(workdir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "citynode.demo", "--headless", "--workdir", str(workdir), *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


def descendants(pid: int) -> dict[int, str]:
    """Every live process below `pid` (children in other sessions included): pid ->
    its start time, so a reused pid is not mistaken for a stray."""
    parents: dict[int, int] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        parents[int(entry.name)] = int(fields[1])
        starts[int(entry.name)] = fields[19]
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                found[child] = starts[child]
                frontier.append(child)
    return found


def alive(procs: dict[int, str]) -> list[int]:
    left = []
    for pid, start in procs.items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[19] == start and fields[0] != "Z":
            left.append(pid)
    return left


def mentioning(text: str) -> list[int]:
    """Processes whose command line names `text` (the demo's work directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.timeout(240)
def test_headless_demo_accounts_for_every_reading(tmp_path):
    """The shortest run that still has an outage (20 s live: cut from 6 s to 12 s)."""
    workdir = tmp_path / "demo"
    proc = demo(workdir, "--duration", "20")
    out, _ = proc.communicate(timeout=220)
    assert proc.returncode == 0, out[-4000:]
    match = SUMMARY.search(out)
    assert match, out[-4000:]
    produced, forwarded, verified, rejected, why, lost = match.groups()
    assert int(produced) > 0
    assert int(lost) == 0
    assert int(verified) == int(produced)
    assert int(forwarded) >= int(produced)
    assert int(rejected) >= 1 and why == "forged"
    for event in ("uplink cut", "uplink restored", "backlog drained",
                  "rejected the forged envelope", "without an account was refused",
                  "with its stolen broker password",
                  "(operator): confirmed by the node, signed"):
        assert event in out, out[-4000:]
    peak = re.search(r"uplink restored after buffering (\d+)", out)
    assert peak and int(peak.group(1)) >= 1, out[-4000:]  # the outage did hold readings back
    assert not mentioning(str(workdir))
    secrets = [(workdir / name).read_text().strip()
               for name in ("wifi-password", "pole-broker.secret", "pole-monitor.secret")]
    secrets += [json.loads(p.read_text())["password"]
                for p in (workdir / "boards" / "state").glob("*/fs/secret/broker.json")]
    assert len(secrets) == 3 + 3                  # the demo's three nodes each have one
    logs = [p.read_text(errors="replace") for p in (workdir / "logs").rglob("*.log")]
    for secret in secrets:
        assert secret not in out and not any(secret in log for log in logs)
    # the operator's private key stays in its 0600 file
    assert "PRIVATE KEY" not in out and not any("PRIVATE KEY" in log for log in logs)
    assert oct((workdir / "ops" / "operator.key.pem").stat().st_mode & 0o777) == "0o600"


@pytest.mark.timeout(400)
def test_headless_demo_rolls_a_signed_update_out_and_loses_nothing(tmp_path):
    """`make demo DEMO_ARGS=--update`: after the live phase the firmware goes out again as
    the next version through the gateway; the node tries it at its next boot, keeps it
    once healthy, and no reading is lost on the way."""
    workdir = tmp_path / "demo"
    proc = demo(workdir, "--duration", "20", "--nodes", "1", "--update")
    out, _ = proc.communicate(timeout=380)
    assert proc.returncode == 0, out[-4000:]
    produced, _, verified, _, _, lost = SUMMARY.search(out).groups()
    assert int(lost) == 0 and int(verified) == int(produced) > 0, out[-4000:]
    assert "rolling out firmware 0.1.1" in out, out[-4000:]
    kept = re.findall(r"update: (cn-[0-9a-f]{12}): committed 0\.1\.1, self-test passed", out)
    assert len(kept) == 1, out[-4000:]
    slot = next((workdir / "boards" / "state").glob("*/fs/app_[ab]/node/version.mpy"))
    assert b"0.1.1" in slot.read_bytes()          # the update's own files, on its flash


@pytest.mark.timeout(120)
def test_ctrl_c_during_provisioning_stops_every_process(tmp_path):
    workdir = tmp_path / "demo"
    proc = demo(workdir, "--duration", "60")
    assert proc.stdout is not None
    seen, started = [], time.monotonic()
    for line in proc.stdout:  # wait until the boards are being flashed
        seen.append(line)
        if "flash start" in line or time.monotonic() - started > 90:
            break
    assert any("flash start" in line for line in seen), "".join(seen)
    children = descendants(proc.pid)
    assert len(children) >= 5, children  # 2 brokers, gateway, emulator (+ boards), provision
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT, "".join(seen) + out
    assert "SIGINT received: stopping everything" in out
    assert "all processes stopped" in out
    assert not alive(children), [Path(f"/proc/{p}/cmdline").read_bytes() for p in
                                 alive(children)]
    assert not mentioning(str(workdir))


def test_ledger_counts_sequence_gaps_as_lost_and_never_counts_a_forgery(tmp_path):
    """The accounting behind the summary, with real ES256 envelopes and a real registry."""
    import cbor2
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from citynode import wire
    from citynode.demo.ledger import Ledger
    from citynode.registry import DeviceRecord, write_record

    device, key = "cn-0123456789ab", ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    write_record(tmp_path, DeviceRecord(device, "ES256", "esp32-devkitc", "demo", "P-1", 48.2,
                                        16.4, "0.1.0", public_key_pem=pem.decode()))

    def envelope(seq: int, boot: int) -> bytes:
        body = {1: device, 2: seq, 3: boot, 5: 1000, 6: wire.KIND_READINGS,
                7: [{0: "light/lux", 1: "lx", 2: 812.5}, {0: "env/temperature", 2: 11.25}]}
        return wire.sign_es256(cbor2.dumps(body), device, key)

    ledger = Ledger(tmp_path)
    for seq in (10, 11, 13):          # 12 never reached the pole's broker
        ledger.on_pole(envelope(seq, boot=1))
    ledger.on_pole(envelope(64, boot=2))  # a reset jumps a reserved block: not a gap
    real = envelope(65, boot=2)
    ledger.on_pole(real)
    ledger.on_pole(real[:-1] + bytes([real[-1] ^ 1]))  # forged: not a reading
    for seq in (10, 11, 13, 64, 65, 65):
        ledger.on_city(f"city/demo/pole-demo/up/{device}", envelope(seq, 1 if seq < 64 else 2))
    ledger.on_city(f"city/demo/pole-demo/up/{device}", real[:-1] + bytes([real[-1] ^ 1]))

    assert ledger.produced() == {(device, s) for s in (10, 11, 12, 13, 64, 65)}
    assert ledger.missing() == {(device, 12)}
    assert ledger.local_invalid == 1 and ledger.upstream_invalid == 1
    assert ledger.duplicates == 1
    node = ledger.nodes[device]
    assert node.values == {"lux": 812.5, "temp": 11.25} and node.readings == 5
    # the lamp's level and what set it, from its window's records, under the node's row
    from citynode.demo.view import GatewayCounters, Status, render
    body = {1: device, 2: 66, 3: 2, 5: 2000, 6: wire.KIND_READINGS,
            7: [{0: "lamp/level", 1: "%", 2: 60}, {0: "lamp/source", 3: "dark"}]}
    ledger.on_city(f"city/demo/pole-demo/up/{device}",
                   wire.sign_es256(cbor2.dumps(body), device, key))
    frame = render(Status("live", 1, 20, ledger.nodes, GatewayCounters(), 0, 0, 0), [], "logs")
    assert "    lamp 60% (dark by its light sensor)" in frame

"""The node under test, reached the way a technician reaches it: its serial port
(unmodified mpremote, the raw REPL; pyserial for the console) and the pole's MQTT
broker. An emulated board adds its control socket, for the faults a bench cannot
make on demand (a Wi-Fi outage, a power cut, a hung part, a gunshot).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import serial
from cryptography.hazmat.primitives.asymmetric import ec

from citynode import wire
from citynode.provisioning.device import SESSION_WDT_MS, last_json
from citynode.subscriber import Message, Subscriber
from citynode.testing.emulator import BoardHandle, guarded, wait_for
from citynode.testing.gateway import GatewayProcess

VENV_BIN = Path(sys.executable).parent
APP_STARTED = "starting"     # the app's console line: "citynode: node X, firmware V, starting"
DELIBERATE = b"from node import safemode; safemode.mark_healthy()\r"
# The app's watchdog runs on when the console interrupts the app: set it long at once,
# as every session on the node does (provisioning/device.py, WDT_GUARD).
GUARD_LINE = f"import machine; machine.WDT(timeout={SESSION_WDT_MS})\r".encode()


@dataclass
class Bench:
    port: str                      # /dev/ttyUSB0, or an emulated board's pty
    device: str
    public_key: ec.EllipticCurvePublicKey   # from the fleet registry, not from the node
    operator: ec.EllipticCurvePrivateKey    # the key provisioning installed for downlinks
    broker: tuple[str, int]
    window_s: int
    emulated: BoardHandle | None = None
    ops_home: Path | None = None   # citynode-ops's folder: the operator key, the city broker
    gateway: GatewayProcess | None = None   # the pole's gateway (emulated pole only)

    # -- serial ----------------------------------------------------------------------
    def mpremote(self, *args: str, timeout: float = 60, check: bool = True,
                 soft_reset: bool = True) -> str:
        """Unmodified mpremote on the node's port, the watchdog set long first (the
        app's dog runs on across mpremote's soft reset: citynode.testing.emulator.guarded).
        soft_reset=False keeps what a soft reset would change (reset_cause())."""
        argv = guarded(args, soft_reset=soft_reset)
        proc = subprocess.run([str(VENV_BIN / "mpremote"), "connect", self.port, *argv],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"mpremote {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def exec(self, code: str, timeout: float = 60, soft_reset: bool = True) -> str:
        """Run code in the raw REPL (mpremote interrupts the app first, then soft-resets
        the board unless soft_reset=False)."""
        return self.mpremote("exec", code, timeout=timeout, soft_reset=soft_reset)

    def exec_json(self, code: str, timeout: float = 60):
        return last_json(self.exec(code, timeout))

    def console(self, until: str, seconds: float, send: bytes = b"") -> str:
        """What the board prints on its console until `until` appears (or time runs out)."""
        seen = b""
        with serial.serial_for_url(self.port, baudrate=115200, timeout=0.2) as port:
            port.write(send)
            deadline = time.monotonic() + seconds
            while until.encode() not in seen and time.monotonic() < deadline:
                seen += port.read(4096)
        return seen.decode(errors="replace")

    def boot_app(self, timeout: float = 30) -> str:
        """A soft reset from the friendly REPL runs main.py, as at power-on.

        Like provisioning's deliberate reset, it first clears the crash-reboot count
        (node/safemode.py), so the suite's many restarts never look like a crash loop.
        """
        out = self.console(APP_STARTED, timeout,
                           send=b"\x03\x03\x02" + GUARD_LINE + DELIBERATE + b"\x04")
        if APP_STARTED not in out:
            board = self.emulated.control("status") if self.emulated else "a real board"
            raise AssertionError(f"the app did not start ({board}); its console:\n{out[-2000:]}")
        return out

    def selftest(self, warmup_s: float = 0) -> dict:
        """The report provisioning verifies; warmup_s waits for the PMS5003's fan."""
        return self.exec_json("from node import p256\np256.precompute()\nimport node.selftest\n"
                              f"node.selftest.main(warmup_s={warmup_s})", timeout=60 + warmup_s)

    def config(self) -> dict:
        return self.exec_json("print(open('/config.json').read().replace(chr(10), ''))")

    def write_config(self, cfg: dict) -> None:
        text = json.dumps(cfg)
        self.exec(f"f = open('/config.json', 'w')\nf.write({text!r})\nf.close()")

    # -- MQTT ------------------------------------------------------------------------
    def listen(self) -> Listener:
        return Listener(self)

    def open(self, envelope: bytes) -> wire.Payload:
        """Decode and verify with the registry's key: what the gateway would accept."""
        return wire.open_envelope(envelope, lambda kid, alg: self.public_key)

    # -- faults (emulated board only) -------------------------------------------------
    def fault(self, cmd: str, **args):
        if self.emulated is None:
            pytest.skip(f"needs fault injection ({cmd}): emulated board only")
        return self.emulated.control(cmd, **args)

    def require_emulator(self, why: str) -> BoardHandle:
        if self.emulated is None:
            pytest.skip(f"{why}: emulated board only")
        return self.emulated


class Listener(Subscriber):
    """The node's envelopes on the pole broker, verified, with their host arrival time."""

    def __init__(self, bench: Bench):
        self.bench = bench
        self.arrivals: list[tuple[float, wire.Payload]] = []
        self.invalid: list[str] = []      # an envelope the registry key does not verify
        super().__init__(*bench.broker, topic=wire.up_topic(bench.device),
                         on_message=self._verify)

    def _verify(self, message: Message) -> None:
        try:
            body = self.bench.open(message.payload)
        except Exception as exc:  # kept for the test's assertion, not raised in paho's thread
            self.invalid.append(f"{exc.__class__.__name__}: {exc}")
            return
        with self.lock:
            self.arrivals.append((time.time(), body))
            self.messages.append((message.topic, message.payload))

    def timed(self, kind: int | None = None) -> list[tuple[float, wire.Payload]]:
        """(host arrival time, body) of each verified envelope, optionally of one kind."""
        with self.lock:
            return [(at, b) for at, b in self.arrivals if kind is None or b.kind == kind]

    def bodies(self, kind: int | None = None) -> list[wire.Payload]:
        return [b for _, b in self.timed(kind)]

    def wait(self, count: int, timeout: float, kind: int | None = None) -> list[wire.Payload]:
        return wait_for(lambda: got if len(got := self.bodies(kind)) >= count else None,
                        timeout=timeout, interval=0.1,
                        what=f"{count} envelope(s) of kind {kind} from {self.bench.device}")

    def __exit__(self, *exc: object) -> None:
        self.close()
        assert not self.invalid, f"envelopes that do not verify: {self.invalid}"


def records(body: wire.Payload) -> dict:
    """name -> value (key 2) or text (key 3) of a payload's records."""
    return {r[0]: r.get(2, r.get(3)) for r in body.records}

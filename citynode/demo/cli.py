"""`python -m citynode.demo`: options, the phases in order, the summary and exit code.

Phases: the two brokers and the city's subscriber; the gateway (up before the nodes,
so nothing they send is missed; each node is registered with it live, by SIGHUP, as
on a pole); the emulated boards, blank; one `citynode-provision provision` for all of
them; then the live phase: a forged envelope early on, the uplink cut from 30% to
60% of the duration; with --update, a signed update of the firmware rolled out to every
node through the gateway; and at the end the nodes stop and the backlog must drain with
nothing lost. Exit 0 only if every reading produced arrived at the city verified, the
forged envelope was rejected and, with --update, every node kept the update.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from citynode import wire
from citynode.gateway.scrape import metric_by_label, metric_sum
from citynode.mosquitto import Mosquitto, MosquittoMissing, PoleBroker, mosquitto_binary
from citynode.subscriber import Subscriber

from .ledger import Ledger, city_watch, pole_watch
from .procs import (
    BOARD,
    GUARD,
    POLE,
    TOPIC_PREFIX,
    UPDATE_BOARD,
    Board,
    Child,
    Gateway,
    Interrupted,
    Processes,
    StepFailed,
    ops_bundle,
    ops_init,
    ops_run,
    provision,
    start_boards,
    start_gateway,
)
from .view import GatewayCounters, LiveView, LogView, Status

MIN_DURATION_S = 20
DRAIN_TIMEOUT_S = 60.0
TICK_S = 0.25
CUT_AT, RESTORE_AT, FORGE_AT = 0.3, 0.6, 0.15  # fractions of the live phase
OPERATOR_AT = 0.7   # the operator's lamp override, once the uplink is back
UPDATE_TIMEOUT_S = 600.0    # the whole rollout: the canary, then the others


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m citynode.demo",
        description="The whole citynode system on this machine: a pole broker and a city "
                    "broker, emulated boards from blank flash provisioned by "
                    "citynode-provision, the gateway, and a live view of what reaches the "
                    "city. Midway the uplink is cut and restored, and a forged envelope is "
                    "injected. Exit 0 only if every reading arrived upstream verified.",
        epilog="Exit codes: 0 every reading arrived verified and the forged envelope was "
               "rejected; 1 something was lost or a step failed (the message names it and "
               "its log); 2 usage or mosquitto missing; 130/143 stopped by SIGINT/SIGTERM. "
               "Ctrl-C stops every process the demo started.")
    parser.add_argument("--duration", type=float, default=180, metavar="S",
                        help="seconds of the live phase, after setup (default 180; at "
                             f"least {MIN_DURATION_S}); the uplink is cut from 30%% to 60%% "
                             "of it")
    parser.add_argument("--headless", action="store_true",
                        help="no live view: one log line per phase and event (for CI)")
    parser.add_argument("--nodes", type=int, default=3, metavar="N",
                        help="emulated boards (default 3)")
    parser.add_argument("--window-s", type=int, default=5, metavar="S",
                        help="the nodes' reading window in seconds (default 5; min 5)")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="work directory, new or empty, kept afterwards (default: a "
                             "fresh temporary one, removed after a successful run)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary work directory (logs) after a success")
    parser.add_argument("--update", action="store_true",
                        help="after the live phase, roll the firmware out to every node as "
                             "the next version (citynode-ops bundle, then ota with one "
                             f"canary); the boards are then {UPDATE_BOARD}s, whose app an "
                             "update can replace")
    args = parser.parse_args(argv)
    if args.duration < MIN_DURATION_S:
        parser.error(f"--duration must be at least {MIN_DURATION_S} s (the outage needs time)")
    if not 1 <= args.nodes <= 8:
        parser.error("--nodes must be 1..8")
    if not 5 <= args.window_s <= 3600:
        parser.error("--window-s must be 5..3600")
    if args.workdir and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty: give a new or empty directory")
    return args


def scenario(duration: float) -> dict:
    """The emulated world: an hour of it per wall minute from a spring dawn (light and
    traffic rising), a pollution episode, a crash and a gunshot during the live phase."""
    scale, setup_s = 60.0, 40.0
    return {"seed": 7, "time_scale": scale, "start": "2026-04-15T06:00:00+02:00",
            "latitude": 48.2, "longitude": 16.37,
            "episodes": [{"start": (setup_s + 0.2 * duration) * scale,
                          "duration": 0.6 * duration * scale, "pm25": 30}],
            "events": [{"time": (setup_s + 0.45 * duration) * scale, "kind": "crash",
                        "level_db": 115},
                       {"time": (setup_s + 0.6 * duration) * scale, "kind": "gunshot",
                        "level_db": 120}]}


@dataclass
class Outcome:
    produced: int
    forwarded: int
    verified: int
    rejected: dict[str, float]
    lost: list[tuple[str, int]]
    problems: list[str]

    def line(self) -> str:
        total = int(sum(self.rejected.values()))
        forged = self.rejected.get("bad_signature", 0)
        why = "(forged)" if total and total == forged else \
            "(" + ", ".join(f"{k} {v:g}" for k, v in sorted(self.rejected.items())) + ")"
        return (f"demo: produced {self.produced}, forwarded {self.forwarded}, verified "
                f"upstream {self.verified}, rejected {total}{' ' + why if total else ''}, "
                f"lost {len(self.lost)}")


class Demo:
    """One run: the phases in order; `stop()` (always called) ends every process."""

    def __init__(self, args: argparse.Namespace, workdir: Path, view: LogView):
        self.args, self.workdir, self.view = args, workdir, view
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs = Processes(self.logs)
        self.registry = workdir / "registry"
        self.ledger = Ledger(self.registry)
        self.watches: list[Subscriber] = []
        self.gateway: Gateway | None = None
        self.emulator: Child | None = None
        self.nodes_stopped = False  # finish() stops the emulator on purpose
        self.pole: PoleBroker | None = None
        self.city: Mosquitto | None = None
        self.pole_watch: Subscriber | None = None
        self.counters = GatewayCounters()
        self.forged: bytes | None = None
        self.forged_baseline = 0.0
        self.boards: dict[str, Board] = {}
        self.outsider_refused: bool | None = None
        self.board = UPDATE_BOARD if args.update else BOARD
        self.update_result: dict | None = None

    # --- phases -------------------------------------------------------------------------
    def run(self) -> Outcome:
        self.start_brokers()
        self.view.phase("creating the operator key (citynode-ops init)")
        ops_init(self.procs, self.workdir, self.city, self.registry)
        self.view.phase("starting the gateway (citynode-gateway broker-accounts, run)")
        self.gateway = start_gateway(self.procs, self.workdir, self.pole, self.city,
                                     self.registry)
        self.pole_watch = pole_watch(self.pole, self.ledger, self.gateway.monitor_secret)
        self.watches.append(self.pole_watch)
        self.try_outsider()
        self.view.phase(f"starting {self.args.nodes} emulated ESP32 boards with blank flash")
        self.emulator, boards = start_boards(self.procs, self.workdir, self.args.nodes,
                                             scenario(self.args.duration), self.board)
        self.boards = {b.device: b for b in boards}
        names = {b.url: b.name for b in boards}
        for board in boards:
            self.view.progress(f"{board.name}: {board.url}  {board.device}")
        self.view.phase("provisioning all boards at once (citynode-provision provision)")
        started = time.monotonic()
        provision(self.procs, self.workdir, boards, self.board, self.pole, self.clock,
                  self.registry, self.args.window_s, lambda e: self.on_provision(names, e))
        self.gateway.reload()
        self.view.event(f"provisioned {len(boards)} boards in "
                        f"{time.monotonic() - started:.0f} s; registry: {self.registry}")
        self.view.phase(f"live for {self.args.duration:.0f} s")
        self.live()
        if self.args.update:
            self.update()
        return self.finish()

    def start_brokers(self) -> None:
        self.view.phase("starting the pole's broker and time server, and the city's broker "
                        "(mosquitto, chronyd)")
        self.pole = self.procs.pole_broker("pole-broker")
        self.clock = self.procs.time_server("pole-chrony")
        self.city = self.procs.broker("city-broker")
        for server in (self.pole, self.clock, self.city):
            self.procs.start_broker(server)
        self.watches = [city_watch(self.city, TOPIC_PREFIX, self.ledger)]
        self.view.progress(f"pole broker 127.0.0.1:{self.pole.port} (gateway) and "
                           f":{self.pole.node_port} (nodes), locked as deploy/ ships it; "
                           f"city broker 127.0.0.1:{self.city.port}; pole time server "
                           f"UDP {self.clock.port}")

    def try_outsider(self) -> None:
        """Someone on the pole's Wi-Fi without an account: the broker must refuse them."""
        assert self.pole is not None
        try:
            Subscriber(self.pole.host, self.pole.node_port, wire.UP_PREFIX + "+",
                       timeout=3).close()
        except ConnectionError:
            self.outsider_refused = True
            self.view.event("a client without an account was refused by the pole broker")
            return
        self.outsider_refused = False

    def on_provision(self, names: dict[str, str], event: dict) -> None:
        """Provisioning's progress as lines; a node just registered goes to the gateway."""
        step, state = event.get("step", "?"), event.get("state", "?")
        if state == "progress":
            return  # per-file and per-block progress: too many lines for a terminal
        who = names.get(event.get("port", ""), event.get("port", "?"))
        message = event.get("message") or ""
        if step == "done":  # the board's last event: "cn-... provisioned"
            self.view.progress(f"{who}: {message or state}")
        else:
            self.view.progress(f"{who}: {step} {state}" + (f": {message}" if message else ""))
        if step == "register" and state in ("done", "skipped") and self.gateway:
            self.gateway.reload()

    def live(self) -> None:
        """The scripted part: the forged envelope, the uplink cut, its restore and drain,
        each at a fraction of the duration so that a short CI run shows them too."""
        duration = self.args.duration
        start = time.monotonic()
        cut = restored = drained = False
        peak = 0
        operator: threading.Thread | None = None
        while (elapsed := time.monotonic() - start) < duration:
            self.poll()
            self.show_impulses()
            if self.forged is None and elapsed >= FORGE_AT * duration:
                self.inject_forged()
            if not cut and elapsed >= CUT_AT * duration:
                cut = True
                self.cut_uplink()
            if cut and not restored and elapsed >= RESTORE_AT * duration:
                restored = True
                self.restore_uplink(peak)
            if cut and not restored:
                peak = max(peak, self.counters.buffered)
            if operator is None and elapsed >= OPERATOR_AT * duration:
                operator = threading.Thread(target=self.operator_override, daemon=True)
                operator.start()
            if restored and not drained and self.counters.buffered == 0:
                drained = True
                self.view.event(f"backlog drained: {peak} buffered at the peak, 0 now")
            self.view.tick(self.status(self.phase_name(elapsed, cut, restored), elapsed))
            time.sleep(TICK_S)

    def show_impulses(self) -> None:
        for ev in self.ledger.take_impulses():
            when = ("its node's clock not synced" if ev.onset_ms is None else
                    time.strftime("%H:%M:%S", time.gmtime(ev.onset_ms / 1000))
                    + f".{ev.onset_ms % 1000:03d} UTC")
            level = "?" if ev.level_dba is None else f"{ev.level_dba:.0f} dBA"
            peak = "?" if ev.lzpeak_db is None else f"{ev.lzpeak_db:.0f} dB"
            self.view.event(f"{ev.device}: {ev.kind or 'impulse'}, {level} (peak {peak}), "
                            f"onset {when}")

    def phase_name(self, elapsed: float, cut: bool, restored: bool) -> str:
        duration = self.args.duration
        if cut and not restored:
            left = RESTORE_AT * duration - elapsed
            return f"UPLINK CUT (back in {left:.0f} s)"
        if restored:
            return "uplink restored"
        return f"normal (uplink cut in {CUT_AT * duration - elapsed:.0f} s)"

    def finish(self) -> Outcome:
        """Stop the nodes, then wait (bounded) until every reading produced is upstream."""
        assert self.emulator is not None
        self.view.phase("stopping the nodes; waiting for the gateway to drain")
        self.nodes_stopped = True
        self.procs.stop(self.emulator)
        time.sleep(1.0)  # what was on its way through the pole's broker
        produced = self.ledger.produced()
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            self.poll()
            if self.counters.reachable and self.counters.buffered == 0 \
                    and produced <= self.ledger.verified():
                break
            self.view.tick(self.status("final drain", self.args.duration))
            time.sleep(TICK_S)
        self.poll()
        final = self.status("done", self.args.duration)
        self.view.tick(final)
        self.view.final(final)
        return self.outcome(produced)

    # --- the injected events ------------------------------------------------------------
    def inject_forged(self) -> None:
        """A copy of a real envelope with one signature byte flipped, published with that
        node's own broker password, as someone who took a node apart could: the broker
        lets it in, the gateway must reject it (bad_signature)."""
        if self.ledger.last_envelope is None or self.pole is None:
            return  # no real envelope yet: try again next tick
        device, data = self.ledger.last_envelope
        stolen = json.loads((self.boards[device].state / "fs" / "secret" / "broker.json")
                            .read_text())["password"]
        self.forged = data[:-1] + bytes([data[-1] ^ 0x01])
        self.forged_baseline = self.counters.rejected.get("bad_signature", 0)
        forger = Subscriber(self.pole.host, self.pole.node_port, wire.down_topic(device),
                            login=(device, stolen))
        try:
            forger.publish(wire.up_topic(device), self.forged)
        finally:
            forger.close()
        self.view.event(f"forged envelope injected as {device} with its stolen broker "
                        "password (signature byte flipped)")

    def operator_override(self) -> None:
        """The operator holds one node's lamp at 30% for a minute, through the city broker
        and the gateway, as `citynode-ops send` does it; the node's answer as an event."""
        device = sorted(self.boards)[0]
        self.view.event(f"operator: citynode-ops send lamp level=30 minutes=1 --device {device}")
        result = ops_run(self.procs, self.workdir, ["send", "lamp", "level=30", "minutes=1",
                                                    "--device", device, "--wait", "30"])
        for node in result.get("nodes", []):
            said = ("confirmed by the node, signed" if node["result"] == "ok" else
                    f"{node['result']} {node['detail']}")
            self.view.event(f"operator: lamp {node['settings'].get('lamp', '?')}% on "
                            f"{node['device']} ({node['settings'].get('lamp_source', '?')}): "
                            f"{said} (command #{node['seq']}, {node['answer_ms']} ms)")
        if not result.get("nodes"):
            self.view.event(f"operator: the command failed: {result.get('message')}")

    def update(self) -> None:
        """The firmware as the next version, bundled and rolled out to the pole's nodes as
        an operator does (docs/ota.md): each takes it into its other slot, tries it at
        its next boot and keeps it once it ran healthy; the first node goes first."""
        version, bundle = ops_bundle(self.procs, self.workdir, self.board)
        self.view.phase(f"rolling out firmware {version} (citynode-ops ota --pole {POLE} "
                        "--canary 1)")
        result: dict = {}
        rollout = threading.Thread(target=lambda: result.update(ops_run(
            self.procs, self.workdir, ["ota", "--bundle", str(bundle), "--pole", POLE,
                                       "--canary", "1", "--wait", "40", "--trial-wait", "300"],
            timeout=UPDATE_TIMEOUT_S)), daemon=True)
        rollout.start()
        while rollout.is_alive():
            self.poll()
            self.show_impulses()
            self.view.tick(self.status(f"updating to {version}", self.args.duration))
            time.sleep(TICK_S)
        self.update_result = result
        for node in result.get("nodes", []):
            self.view.event(f"update: {node['device']}: {node['state']} {node['detail']} "
                            f"({node['sent']} bytes sent)")
        if not result.get("nodes"):
            self.view.event(f"update: the rollout failed: {result.get('message')}")

    def cut_uplink(self) -> None:
        assert self.city is not None
        self.city.stop()
        self.view.event("uplink cut: the city broker is stopped; the gateway buffers")

    def restore_uplink(self, peak: int) -> None:
        assert self.city is not None
        self.procs.start_broker(self.city)  # same port, same persistence file
        self.view.event(f"uplink restored after buffering {peak}; the backlog drains")

    # --- watching ------------------------------------------------------------------------
    def poll(self) -> None:
        """Refresh the gateway counters from /metrics; a dead child is a failed step."""
        assert self.gateway is not None
        watched = [self.gateway.child] + ([self.emulator] if self.emulator and
                                          not self.nodes_stopped else [])
        for child in watched:
            if child.proc.poll() is not None:
                raise StepFailed(f"the {child.name}", f"it exited with {child.proc.returncode}",
                                 child.log)
        before = self.counters.rejected.get("bad_signature", 0)
        try:
            text = self.gateway.metrics()
        except OSError:
            self.counters.reachable = False
            return
        self.counters = GatewayCounters(
            reachable=True, uplink_up=metric_sum(text, "uplink_up") > 0,
            buffered=int(metric_sum(text, "buffered_messages")),
            forwarded=int(metric_sum(text, "forwarded_total")),
            rejected=metric_by_label(text, "rejected_total", "reason"))
        now = self.counters.rejected.get("bad_signature", 0)
        if self.forged is not None and before <= self.forged_baseline < now:
            self.view.event("the gateway rejected the forged envelope (bad_signature)")

    def status(self, phase: str, elapsed: float) -> Status:
        produced, verified = self.ledger.produced(), self.ledger.verified()
        with self.ledger.lock:
            nodes = {k: v for k, v in self.ledger.nodes.items()}
        return Status(phase, elapsed, self.args.duration, nodes, self.counters,
                      len(produced), len(produced & verified), len(produced - verified))

    def outcome(self, produced: set[tuple[str, int]]) -> Outcome:
        verified = produced & self.ledger.verified()
        lost = sorted(produced - verified)
        rejected = dict(self.counters.rejected)
        problems = []
        if not produced:
            problems.append(f"no reading was produced (see {self.logs / 'emulator.log'})")
        if lost:
            shown = ", ".join(f"{d}#{s}" for d, s in lost[:5])
            problems.append(f"{len(lost)} reading(s) never arrived upstream verified: {shown}"
                            f" (see {self.logs / 'gateway.log'})")
        if not self.outsider_refused:
            problems.append("the pole broker let in a client without an account")
        if self.forged is None:
            problems.append("no forged envelope was injected (no real envelope to copy)")
        elif rejected.get("bad_signature", 0) <= self.forged_baseline:
            problems.append("the gateway did not reject the forged envelope")
        if self.ledger.upstream_invalid:
            problems.append(f"{self.ledger.upstream_invalid} envelope(s) at the city failed "
                            "verification: the forged one was forwarded")
        if not self.counters.reachable:
            problems.append("the gateway's /metrics did not answer at the end")
        if self.update_result is not None:
            nodes = self.update_result.get("nodes", [])
            kept = [n for n in nodes if n["state"] == "committed"]
            if not nodes or len(kept) < len(nodes):
                problems.append(f"{len(kept)} of {len(nodes)} nodes kept the update (see "
                                f"{self.logs / 'ops-ota.log'})")
        return Outcome(len(produced), self.counters.forwarded, len(verified), rejected, lost,
                       problems)

    def stop(self) -> None:
        for watch in self.watches:
            try:
                watch.close()
            except Exception:  # a watcher that cannot disconnect must not block the cleanup
                pass
        self.procs.stop_all()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        mosquitto_binary()
    except MosquittoMissing as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="citynode-demo-")) if temporary else args.workdir
    workdir = workdir.resolve()
    logs = workdir / "logs"
    interactive = not args.headless and sys.stdout.isatty()
    view = LiveView(str(logs)) if interactive else LogView(str(logs))
    GUARD.install()
    demo, code, outcome = None, 1, None
    try:
        demo = Demo(args, workdir, view)
        outcome = demo.run()
        code = 0 if not outcome.problems else 1
    except Interrupted as exc:
        view.close()
        print(f"demo: {exc} received: stopping everything", flush=True)
        code = 128 + exc.signum
    except StepFailed as exc:
        view.close()
        sys.stdout.flush()
        print(f"demo: {exc}", file=sys.stderr, flush=True)
    except Exception:  # still stop everything and say where the logs are
        view.close()
        print("demo: unexpected error (please report it with the logs):", file=sys.stderr)
        traceback.print_exc()
    finally:
        GUARD.ignore()
        view.close()
        if demo is not None:
            demo.stop()
    if outcome is not None:
        print(outcome.line())
        for problem in outcome.problems:
            print(f"demo: FAILED: {problem}")
    if code == 0 and temporary and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"demo: all processes stopped; removed {workdir} (--keep or --workdir keep the "
              "logs)")
    else:
        print(f"demo: all processes stopped; logs in {logs}")
    return code

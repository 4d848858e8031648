"""One command to many nodes: numbered, signed, sent, and each node's answer awaited.

A node answers every command it gets, refusals too, with a signed status envelope:
`cmd/<name>` (ok, or what it returns) or `cmd/refused` (the reason), `cmd/seq` (the
highest command number it has accepted) and the settings it runs with (`set/...`).
A node that refuses a number as `replayed` (its highest is above ours: another
operator machine, or ours lost its numbers) is sent the command once more, numbered
above what it said, after the gateway's refill time (its relay passes a few commands
per node at once, then one per REFILL_S: gateway/downlink.py).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec

from citynode.gateway.downlink import REFILL_S

from . import commands
from .city import Answer, CityLink, Node
from .home import OpsHome

OK, REFUSED, NO_ANSWER = "ok", "refused", "no_answer"


@dataclass
class Outcome:
    node: Node
    seq: int
    result: str = NO_ANSWER
    detail: str = ""                        # the node's answer, or why it refused
    settings: dict = field(default_factory=dict)
    verified: bool = False
    answer_ms: int | None = None
    resent: bool = False

    def to_dict(self) -> dict:
        return {"device": self.node.device, "gateway": self.node.gateway,
                "site": self.node.site, "pole": self.node.pole, "seq": self.seq,
                "result": self.result, "detail": self.detail, "settings": self.settings,
                "verified": self.verified, "answer_ms": self.answer_ms, "resent": self.resent}


def _next_numbers(home: OpsHome, devices: list[str], above: dict[str, int]) -> dict[str, int]:
    """A fresh number per device, above what was sent before and what a node said."""
    with home.numbers() as numbers:
        for device in devices:
            numbers[device] = max(numbers.get(device, 0), above.get(device, 0)) + 1
        return {device: numbers[device] for device in devices}


class Delivery:
    def __init__(self, link: CityLink, home: OpsHome, key: ec.EllipticCurvePrivateKey,
                 name: str, args: dict | Callable[[Node], dict], expires_s: int):
        """`args`: the command's arguments, or a function giving each node its own."""
        self.link, self.home, self.key = link, home, key
        self.name, self.args, self.expires_s = name, args, expires_s
        self.outcomes: dict[str, Outcome] = {}
        self._sent_at: dict[str, float] = {}
        self._resend: dict[str, tuple[float, int]] = {}     # device -> (when, node's seq)

    def run(self, nodes: list[Node], wait_s: float) -> list[Outcome]:
        self._send(nodes, {})
        deadline = time.monotonic() + wait_s
        while any(o.result == NO_ANSWER for o in self.outcomes.values()):
            now = time.monotonic()
            if now >= deadline:
                break
            for device, (when, node_seq) in list(self._resend.items()):
                if now >= when:
                    del self._resend[device]
                    self._send([self.outcomes[device].node], {device: node_seq})
            try:
                answer = self.link.answers.get(timeout=min(deadline - now, 0.2))
            except queue.Empty:
                continue
            self._take(answer)
        return [self.outcomes[n.device] for n in nodes]

    def _send(self, nodes: list[Node], above: dict[str, int]) -> None:
        numbers = _next_numbers(self.home, [n.device for n in nodes], above)
        for node in nodes:
            seq = numbers[node.device]
            resent = node.device in self.outcomes
            self.outcomes[node.device] = Outcome(node, seq, resent=resent)
            self._sent_at[node.device] = time.monotonic()
            args = self.args(node) if callable(self.args) else self.args
            self.link.send(node, commands.signed(self.key, node.device, seq, self.name,
                                                 args, self.expires_s))

    def _take(self, answer: Answer) -> None:
        outcome = self.outcomes.get(answer.device)
        if outcome is None or outcome.result != NO_ANSWER:
            return
        if answer.at < self._sent_at[answer.device]:
            return                      # an answer to something sent before this run
        records = answer.records
        node_seq = records.get("cmd/seq")
        reason = records.get("cmd/refused")
        if reason is None and f"cmd/{self.name}" not in records:
            return                      # a status of another kind (a crash report)
        if reason is None and node_seq != outcome.seq:
            return                      # another operator's command, answered
        if reason == "replayed" and not outcome.resent and isinstance(node_seq, int):
            if answer.device not in self._resend:
                self._resend[answer.device] = (time.monotonic() + REFILL_S, node_seq)
            return
        outcome.result = REFUSED if reason else OK
        outcome.detail = str(records.get("cmd/detail", reason) if reason
                             else records[f"cmd/{self.name}"])
        outcome.settings = {k[4:]: v for k, v in records.items() if k.startswith("set/")}
        outcome.verified = answer.verified
        outcome.answer_ms = round((answer.at - self._sent_at[answer.device]) * 1000)
        if isinstance(node_seq, int):
            with self.home.numbers() as numbers:
                numbers[answer.device] = max(numbers.get(answer.device, 0), node_seq)

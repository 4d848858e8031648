"""A signed bundle rolled out to nodes through their gateways (docs/ota.md).

Each node gets, as signed commands: `ota_begin` (the signed manifest; the node answers
how much of the bundle its other slot already holds), `ota_chunk`s from there (each
answer says where it now stands, so any break resumes), and `ota_finish` (the node
checks every file and resets into a trial boot). The rollout then waits for each
node's `ota/committed` (it ran healthy and reached the city) or `ota/reverted` (its
trial boot ended early and it runs the version before). Canaries go first; when one
does not commit, the rest are not touched.
"""

from __future__ import annotations

import queue
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from citynode.gateway.buckets import Buckets
from citynode.gateway.downlink import OTA_BURST, OTA_PER_S

from .bundle import Manifest
from .city import CityLink, Node
from .home import OpsHome
from .send import OK, Delivery

CHUNK_BYTES = 2048          # a command stays under the wire format's 4 KB envelope
EXPIRES_S = 300
TRIES = 3                   # a chunk with no answer is sent again this often
BEGINS = 5                  # a node that restarts mid-update is begun again this often
_OFFSET = re.compile(r"(?:offset|send from) (\d+)")
_FORGOTTEN = "no update under way"     # the node's answer after a restart (node/app.py)


@dataclass
class NodeUpdate:
    node: Node
    offset: int = 0
    state: str = "pending"      # begin, sending, finished, committed, reverted, failed
    detail: str = ""
    begun: int = 0              # times begun again after the node restarted
    sent: int = 0               # the bundle's bytes sent, chunks sent again included

    def to_dict(self) -> dict:
        return {"device": self.node.device, "pole": self.node.pole, "state": self.state,
                "offset": self.offset, "sent": self.sent, "detail": self.detail}


class Rollout:
    def __init__(self, link: CityLink, home: OpsHome, key: ec.EllipticCurvePrivateKey,
                 signed: bytes, manifest: Manifest, blob: bytes,
                 say: Callable[[str], None] = lambda text: print(text, file=sys.stderr)):
        self.link, self.home, self.key = link, home, key
        self.signed, self.manifest, self.blob = signed, manifest, blob
        self.say = say

    def run(self, nodes: list[Node], canaries: int, answer_s: float,
            trial_s: float) -> list[NodeUpdate]:
        updates = [NodeUpdate(n) for n in nodes]
        groups = [updates[:canaries], updates[canaries:]] if canaries else [updates]
        for number, group in enumerate(g for g in groups if g):
            self._update(group, answer_s, trial_s)
            if number == 0 and canaries and any(u.state != "committed" for u in group):
                for u in updates[canaries:]:
                    u.state, u.detail = "skipped", "a canary did not commit"
                break
        return updates

    def _update(self, group: list[NodeUpdate], answer_s: float, trial_s: float) -> None:
        """Begin, chunks, finish; a node that restarted on the way (a power cut, a crash)
        has forgotten the update it was taking: it is begun again and goes on from what
        its slot holds."""
        size = len(self.blob)
        # each gateway's quota, kept with a margin: a chunk it drops is never answered,
        # and costs the node a whole --wait before it goes again
        quota = Buckets(OTA_BURST // 2, OTA_PER_S * 0.75, time.monotonic)
        for u in group:
            u.state = "begin"
        while True:
            begin = [u for u in group if u.state == "begin"]
            due = [u for u in group if u.state == "sending" and u.offset < size]
            ready = [u for u in group if u.state == "sending" and u.offset >= size]
            if begin:
                self._step(begin, "ota_begin", lambda u: {"manifest": self.signed}, answer_s)
            elif due:
                now = [u for u in due if quota.take(u.node.gateway)]
                if not now:
                    time.sleep(1 / OTA_PER_S)
                    continue
                self._step(now, "ota_chunk", self._chunk, answer_s)
            elif ready:
                self._step(ready, "ota_finish", lambda u: {}, answer_s, done="finished")
            else:
                break
        self._await_trial([u for u in group if u.state == "finished"], trial_s)

    def _chunk(self, u: NodeUpdate) -> dict:
        data = self.blob[u.offset:u.offset + CHUNK_BYTES]
        u.sent += len(data)
        return {"at": u.offset, "data": data}

    def _step(self, group: list[NodeUpdate], name: str, args: Callable[[NodeUpdate], dict],
              answer_s: float, done: str = "sending") -> None:
        """One command to each node of `group` (its own arguments), answers awaited; a
        node with no answer is asked again, TRIES times in all."""
        by_device = {u.node.device: u for u in group}
        todo = list(group)
        for _ in range(TRIES):
            if not todo:
                return
            outcomes = Delivery(self.link, self.home, self.key, name,
                                lambda n: args(by_device[n.device]),
                                EXPIRES_S).run([u.node for u in todo], answer_s)
            todo = []
            for o in outcomes:
                u = by_device[o.node.device]
                found = _OFFSET.search(o.detail)
                if o.result == OK:
                    u.state = done
                    if found:
                        self._progress(u, int(found.group(1)))
                elif o.result == "refused" and "out_of_order" in o.detail and found:
                    self._progress(u, int(found.group(1)))      # it says where to go on
                elif o.result == "refused" and u.begun and (
                        f"runs {self.manifest.version}," in o.detail):
                    u.state = "finished"    # it restarted into the update's trial boot
                elif o.result == "refused" and _FORGOTTEN in o.detail and u.begun < BEGINS:
                    u.state = "begin"
                    u.begun += 1
                    self.say(f"{u.node.device}: restarted during the update: resuming")
                elif o.result == "refused" and "failed_trial" in o.detail:
                    u.state, u.detail = "reverted", o.detail   # it went back, restarting
                    self.say(f"{u.node.device}: {o.detail}")
                elif o.result == "refused":
                    u.state, u.detail = "failed", o.detail
                    self.say(f"{u.node.device}: refused: {o.detail}")
                else:
                    todo.append(u)
        for u in todo:
            u.state, u.detail = "failed", f"no answer to {name} after {TRIES} tries"
            self.say(f"{u.node.device}: {u.detail}")

    def _progress(self, u: NodeUpdate, offset: int) -> None:
        size = len(self.blob)
        if offset * 10 // size != u.offset * 10 // size or offset == size:
            self.say(f"{u.node.device}: {offset * 100 // size} % ({offset} of {size} bytes)")
        u.offset = offset

    def _await_trial(self, group: list[NodeUpdate], trial_s: float) -> None:
        """Each node's word on its trial boot: ota/committed or ota/reverted."""
        waiting = {u.node.device: u for u in group}
        deadline = time.monotonic() + trial_s
        if waiting:
            self.say(f"waiting up to {trial_s:g} s for {len(waiting)} node(s) to run "
                     f"{self.manifest.version} on trial")
        while waiting and time.monotonic() < deadline:
            try:
                answer = self.link.answers.get(timeout=0.5)
            except queue.Empty:
                continue
            u = waiting.get(answer.device)
            if u is None:
                continue
            records = answer.records
            if "ota/committed" in records:
                u.state = "committed"
                u.detail = f"{records['ota/committed']}, self-test {records.get('ota/selftest')}"
            elif "ota/reverted" in records:
                u.state = "reverted"
                u.detail = (f"{records['ota/reverted']} failed its trial boot: "
                            f"{records.get('ota/why', 'no reason given')}")
            else:
                continue
            self.say(f"{u.node.device}: {u.state} {u.detail}")
            del waiting[answer.device]
        for u in waiting.values():
            u.state, u.detail = "failed", f"no word from its trial boot in {trial_s:g} s"


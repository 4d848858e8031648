"""Downlink commands: verified against the operator key, then carried out.

Nothing in a command is acted on before its COSE_Sign1 signature verifies with the
operator key provisioned on the node. A replayed command (sequence number not above
the last accepted one, kept across resets) is refused, before the signature check when
its number can be read (that check costs the chip ~1.5 s; a forged number can only get
a command refused sooner, since only a verified one is ever accepted). Every refusal is
counted and reported upstream in a status record; nothing is done.

A command is for now: issued more than MAX_AGE_S ago, or more than MAX_AHEAD_S ahead, or
past its own deadline (key 12, when the operator set one), by the node's clock it is
refused as expired (yesterday's "lamp 100" must not light a street today). Before the
node's first clock sync only the gateway's same checks stand.
"""

from node import cose, seqno
from node.clock import CLOCK
from node.signer import run_steps

# The host's words (citynode/wire.py REASONS, tests/vectors/wire.json "reasons").
REFUSED_REASONS = ("oversized", "malformed", "bad_signature", "wrong_device", "replayed",
                   "no_operator_key", "unknown_command", "bad_args", "expired")
MAX_AGE_S = 600     # the gateway's limits too (gateway/downlink.py)
MAX_AHEAD_S = 60


class CommandRefused(ValueError):
    def __init__(self, reason, detail):
        super().__init__(reason + ": " + detail)
        self.reason = reason


class Commands:
    """Decides on commands; `actions` maps a command name to a function(args), which may be
    a coroutine function. `complete` runs the signature check's steps (node.signer:
    Signer.complete; by default in the calling task), so the loop never waits ~2 s for it."""

    def __init__(self, device, keys, actions, base="/data", complete=run_steps, clock=CLOCK):
        self.device = device
        self.keys = keys
        self.actions = actions
        self.complete = complete
        self.clock = clock
        self.highest = seqno.Highest(base, "cmdseq")
        self.accepted = 0
        self.refused = {}

    def _refuse(self, reason, detail):
        self.refused[reason] = self.refused.get(reason, 0) + 1
        raise CommandRefused(reason, detail)

    def _refuse_replay(self, seq):
        self._refuse("replayed", "command seq %d is not above %d" % (seq, self.highest.value))

    def _check_time(self, issued, expires):
        now = self.clock.unix_ms()
        if now is None:
            return
        if not isinstance(issued, int):
            self._refuse("malformed", "the command has no issue time (key 4)")
        age = now // 1000 - issued
        if age > MAX_AGE_S or age < -MAX_AHEAD_S:
            self._refuse("expired", "issued %d s %s by the node's clock" % (
                abs(age), "ago" if age > 0 else "ahead"))
        if expires is not None and now // 1000 > expires:
            self._refuse("expired", "its deadline passed %d s ago" % (now // 1000 - expires))

    async def handle(self, envelope):
        """Verify and carry out one command; returns (name, result) or raises CommandRefused."""
        operator = self.keys.operator_key()
        if operator is None:
            self._refuse("no_operator_key", "no operator key installed; provision it first")
        seq = cose.peek_command_seq(envelope)
        if seq is not None and seq <= self.highest.value:
            self._refuse_replay(seq)
        try:
            cmd = await self.complete(cose.open_command_steps(envelope, operator, self.device))
        except ValueError as exc:
            text = str(exc)
            reason = text.split(":", 1)[0]
            self._refuse(reason if reason in REFUSED_REASONS else "malformed", text)
        self._check_time(cmd.get(4), cmd.get(12))
        name, args = cmd[10], cmd.get(11, {})
        action = self.actions.get(name)
        if action is None:
            self._refuse("unknown_command", name)
        if not self.highest.accept(cmd[2]):
            self._refuse_replay(cmd[2])
        try:
            result = action(args)
            if hasattr(result, "send"):  # a coroutine (key rotation runs in steps)
                result = await result
        except (KeyError, TypeError, ValueError) as exc:
            self._refuse("bad_args", "%s: %s" % (name, exc))
        self.accepted += 1
        return name, result

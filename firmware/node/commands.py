"""Downlink commands: verified against the operator key, then carried out.

Nothing in a command is looked at before its COSE_Sign1 signature verifies with
the operator key provisioned on the node; a replayed command (sequence number not
above the last accepted one, kept across resets) is refused. Every refusal is
counted and reported upstream in a status record; nothing is done.
"""

from node import cose, seqno

# The host's words (citynode/wire.py REASONS, tests/vectors/wire.json "reasons").
REFUSED_REASONS = ("oversized", "malformed", "bad_signature", "wrong_device", "replayed",
                   "no_operator_key", "unknown_command", "bad_args")


class CommandRefused(ValueError):
    def __init__(self, reason, detail):
        super().__init__(reason + ": " + detail)
        self.reason = reason


class Commands:
    """Decides on commands; `actions` maps a command name to a function(args)."""

    def __init__(self, device, keys, actions, base="/data"):
        self.device = device
        self.keys = keys
        self.actions = actions
        self.highest = seqno.Highest(base, "cmdseq")
        self.accepted = 0
        self.refused = {}

    def _refuse(self, reason, detail):
        self.refused[reason] = self.refused.get(reason, 0) + 1
        raise CommandRefused(reason, detail)

    def handle(self, envelope):
        """Verify and carry out one command; returns (name, result) or raises CommandRefused."""
        operator = self.keys.operator_key()
        if operator is None:
            self._refuse("no_operator_key", "no operator key installed; provision it first")
        try:
            cmd = cose.open_command(envelope, operator, self.device)
        except ValueError as exc:
            text = str(exc)
            reason = text.split(":", 1)[0]
            self._refuse(reason if reason in REFUSED_REASONS else "malformed", text)
        name, args = cmd[10], cmd.get(11, {})
        action = self.actions.get(name)
        if action is None:
            self._refuse("unknown_command", name)
        if not self.highest.accept(cmd[2]):
            self._refuse("replayed", "command seq %d is not above %d" % (cmd[2],
                                                                      self.highest.value))
        try:
            result = action(args)
        except (KeyError, TypeError, ValueError) as exc:
            self._refuse("bad_args", "%s: %s" % (name, exc))
        self.accepted += 1
        return name, result

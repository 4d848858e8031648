"""One command-line style for citynode's console scripts (docs/cli.md).

Each script builds an argparse parser whose subcommands set `func` (a function of the
parsed arguments that returns the exit code) and hands it to `run`. Library code
raises CliError subclasses that say what happened and what to do; `run` turns them
into one line on stderr (or a JSON result with --json) and the error's exit code, so
exit codes exist only at this edge.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1      # the command ran and the answer is no (unhealthy, not verified, ...)
EXIT_USAGE = 2       # wrong arguments, config or catalogue: fix the command line or the file
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """`message` says what went wrong, `fix` what to do about it."""

    exit_code = EXIT_FAILED
    kind = "failed"

    def __init__(self, message: str, fix: str = "", exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.message}; {self.fix}" if self.fix else self.message

    def to_dict(self) -> dict[str, str]:
        return {"error": self.kind, "message": self.message, "fix": self.fix}


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="machine-readable output on stdout (docs/cli.md)")


def print_result(obj: dict[str, Any], human: str, as_json: bool) -> None:
    """A command's result: {"result": obj} as one JSON line, or the human text."""
    if as_json:
        sys.stdout.write(json.dumps({"result": obj}, default=str) + "\n")
    else:
        sys.stdout.write(human.rstrip("\n") + "\n")
    sys.stdout.flush()


def print_error(prog: str, exc: CliError, as_json: bool) -> None:
    if as_json:
        print_result(exc.to_dict() | {"ok": False}, "", True)
        return
    sys.stderr.write(f"{prog}: error: {exc.message}\n")
    if exc.fix:
        sys.stderr.write(f"  what to do: {exc.fix}\n")


def run(prog: str, parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
        interrupted: str = "") -> int:
    """Parse, call the subcommand's `func`, and map a CliError to its exit code;
    `interrupted` is what to tell a user who pressed Ctrl-C."""
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CliError as exc:
        print_error(prog, exc, getattr(args, "json", False))
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted" + (f"; {interrupted}" if interrupted else "")
                         + "\n")
        return EXIT_INTERRUPTED

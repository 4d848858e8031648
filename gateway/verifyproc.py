"""The verifier process: decodes and verifies envelopes beside the daemon's process.

Why: ES256 verification and CBOR decoding hold Python's GIL for most of a message's
cost, and the same interpreter also runs both MQTT clients and the SQLite writer. A
second process gives verification its own interpreter (and core) and leaves the
daemon's threads the relaying and the bookkeeping.

It is a pure function server, so no guarantee moves with it: the daemon still commits
before it acknowledges, and an envelope inside this pipeline when anything dies was
never acknowledged, so the local broker sends it again. Requests and replies travel in
order over one pipe: an envelope (ingest.pack_envelope, packed by hand) -> a list of
`(token, item-fields | None, reason, detail)`. Pickled control requests: `("reload",)`
re-reads the registry in-band (envelopes before it are checked against the old one);
`("sync", n)` is echoed once everything before it is answered; `("exit",)` ends the
process, as does a closed pipe. It is killed with its parent (PR_SET_PDEATHSIG), so a
SIGKILLed daemon leaves no orphan.
"""

from __future__ import annotations

import ctypes
import logging
import pickle
import signal
from multiprocessing.connection import Connection
from pathlib import Path

from citynode.registry import Registry, RegistryError, load_registry

from .ingest import Rejected, Verifier, unpack_envelope

log = logging.getLogger("citynode.gateway.verify")

PR_SET_PDEATHSIG = 1
MAX_BATCH = 256  # replies per pipe write


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the daemon dies, however it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the closed pipe still ends us
        pass


def verify_one(verifier: Verifier, topic: str, data: bytes, received_at: float
               ) -> tuple[tuple | None, str, str]:
    """(item fields, "", "") for an accepted envelope, (None, reason, detail) otherwise."""
    try:
        item = verifier.check(topic, data, received_at)
    except Rejected as exc:
        return None, exc.reason, str(exc)
    except Exception as exc:  # a decoder bug must not take the ingest down
        log.exception("unexpected error verifying a message on %r", topic)
        return None, "internal_error", exc.__class__.__name__
    return (item.device, item.seq, item.data, item.received_at, item.event,
            item.node_time), "", ""


def main(conn: Connection, registry_dir: str, max_bytes: int) -> None:
    die_with_parent()
    # Ctrl-C and SIGHUP reach the whole process group: the daemon handles them. SIGTERM
    # keeps its default, so multiprocessing's exit handler can always end us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    registry = _load(Path(registry_dir), None)
    verifier = Verifier(lambda: registry, max_bytes)
    while True:
        try:
            frames = [conn.recv_bytes()]
            while len(frames) < MAX_BATCH and conn.poll():
                frames.append(conn.recv_bytes())
        except (EOFError, OSError):
            return
        replies: list = []
        for frame in frames:
            if frame[:1] == b"E":
                topic, data, received_at, token = unpack_envelope(frame)
                replies.append((token, *verify_one(verifier, topic, data, received_at)))
                continue
            request = pickle.loads(frame)
            kind = request[0]
            if kind == "reload":
                registry = _load(Path(registry_dir), registry)
            elif kind == "sync":
                replies.append(("sync", request[1], "", ""))
            elif kind == "exit":
                return
        if replies:
            try:
                conn.send(replies)
            except (BrokenPipeError, OSError):
                return


def _load(directory: Path, previous: Registry | None) -> Registry:
    try:
        return load_registry(directory)
    except RegistryError:  # the daemon logs it; keep what we had
        return previous if previous is not None else Registry(directory, {}, [])

"""Signed updates of the app, into the slot not running, tried once, then kept or left.

Slots: the app provisioned on the node (the filesystem's root, or the ROMFS partition)
and two update folders, /app_a and /app_b. main.py, which no update replaces, puts the
slot that /data/ota.json names first on sys.path. An update (an operator's bundle,
docs/ota.md) goes into the slot not running:
- begin() checks the operator's signature on the manifest and that the bundle is for
  this node (board, MicroPython, a newer version, room on the flash) before anything
  is written;
- write() adds the bundle's bytes at the offset the slot has reached, so a download
  resumes after any break (a power cut loses only what the flash had not taken);
- finish() checks every file's SHA-256 (a bad file is removed and fetched again) and
  makes the slot the one to try at the next boot.
The slot always holds a prefix of the bundle's bytes, so where it ends is the offset.
That boot runs it on trial: its self-test (node/app.py) leaves it (fail()) when a sensor
fails that did not before, and commits it (commit()) once every other sensor has read,
it has run HEALTHY_S and reached the city. If the boot ends first (a crash, the
watchdog, a power cut), main.py runs the slot before at the next one, as the ESP-IDF
bootloader does with an app left pending verification.
"""

import json
import os
import sys
from hashlib import sha256

from node import cbor, cose, ec, fsutil, version
from node.signer import run_steps

ROOT = ""                   # the filesystem's root ("": the node's; a folder in tests)
STATE = "/data/ota.json"    # main.py reads it
SLOTS = ("/app_a", "/app_b")
MANIFEST = "manifest.cose"
FORMAT = 1
PIECE = 512                 # bytes hashed or copied at a time: no big buffer
# sys.implementation._mpy bits 10..13 (MicroPython's native architectures)
ARCHES = (None, "x86", "x64", "armv6", "armv6m", "armv7m", "armv7em", "armv7emsp",
          "armv7emdp", "xtensa", "xtensawin", "rv32imc", "rv64imc")


class UpdateRefused(ValueError):
    """An update this node will not take: `reason` is one word for the operator's count
    (bad_signature, malformed, wrong_board, not_newer, failed_trial, no_room, out_of_order,
    bad_file, nothing_to_finish), the message says what to do."""

    def __init__(self, reason, detail):
        super().__init__(reason + ": " + detail)
        self.reason = reason


def _version(text):
    try:
        return tuple(int(part) for part in text.split("."))
    except (AttributeError, ValueError):
        raise UpdateRefused("malformed", "version %r is not N.N.N" % (text,))


def state():
    """What /data/ota.json says ({} before the first update)."""
    try:
        with open(ROOT + STATE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save(values):
    path = ROOT + STATE
    fsutil.makedirs(path[:path.rfind("/")])
    fsutil.write_atomic(path, json.dumps(values).encode())


def running_slot():
    """The slot this app was imported from (main.py put it first on sys.path), or None."""
    first = sys.path[0] if sys.path else None
    return first if first in (ROOT + SLOTS[0], ROOT + SLOTS[1]) else None


def on_trial():
    """True while this boot runs an update that is not committed yet."""
    values = state()
    return values.get("state") == "trial" and values.get("slot") == running_slot()


def commit():
    """Keep the update this boot runs; its version (None if there was none on trial)."""
    if not on_trial():
        return None
    values = state()
    values["state"] = "ok"
    _save(values)
    return values.get("version")


def trial_faults():
    """The sensors that were failing already when the update on trial was received: its
    self-test does not hold those against it."""
    return state().get("faults") or []


def fail(why):
    """The update on trial is to be left: `why` is kept for the app that runs after the
    reset (main.py goes back at the next boot)."""
    values = state()
    values["why"] = why
    _save(values)


def take_reverted():
    """(version, why) of the update that failed its trial, once (the app says so in a
    signed status), or None."""
    values = state()
    if values.get("state") != "reverted" or values.get("told"):
        return None
    values["told"] = True
    _save(values)
    return values.get("failed"), values.get("why") or "unknown"


class Update:
    """Receives one bundle into the slot not running. `operator_key`: SEC1 bytes
    (keys.NodeKeys.operator_key()); `board`: this node's name in boards.yaml (config.json),
    None to leave that check to the .mpy architecture; `complete` runs the signature
    check's steps (node.signer)."""

    def __init__(self, operator_key, board=None, complete=run_steps):
        self.operator_key = operator_key
        self.board = board
        self.complete = complete
        self.slot = ROOT + (SLOTS[1] if running_slot() == ROOT + SLOTS[0] else SLOTS[0])
        self.manifest = None
        self.files = []

    async def begin(self, signed):
        """Check the signed manifest; the slot is made ready for it (kept as it is when it
        already holds this bundle's first bytes: a resumed download). Returns the manifest
        map. An older version goes only when the manifest says "downgrade": true (the
        operator signed it as one). A replayed manifest cannot come: it travels in a
        command, numbered and signed (node/commands.py)."""
        if self.operator_key is None:
            raise UpdateRefused("bad_signature", "no operator key on this node: provision it")
        try:
            payload = await self.complete(cose.verify_sign1_steps(
                signed, self.operator_key, kid=cose.OPERATOR_KID))
            manifest = cbor.decode(payload)
        except ValueError as exc:       # cose's "<reason>: <detail>"
            reason, _, detail = str(exc).partition(": ")
            raise UpdateRefused("bad_signature" if reason == "bad_signature" else "malformed",
                                detail or reason)
        self._check(manifest, manifest.get("downgrade") is True)
        kept = fsutil.read(fsutil.join(self.slot, MANIFEST)) if fsutil.exists(self.slot) else None
        if kept != signed:
            self._clear()
            fsutil.makedirs(self.slot)
            with open(fsutil.join(self.slot, MANIFEST), "wb") as f:
                f.write(signed)
        self.manifest = manifest
        self.files = manifest["files"]
        return manifest

    def _check(self, m, downgrade):
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise UpdateRefused("malformed", "not a format-%d manifest: update the node's "
                                "firmware over the cable, or build the bundle with "
                                "this release's tools" % FORMAT)
        files = m.get("files")
        if not (isinstance(files, list) and files and all(
                isinstance(f, list) and len(f) == 3 and isinstance(f[0], str)
                and ".." not in f[0] and not f[0].startswith("/") and f[0] != MANIFEST
                and isinstance(f[1], int)
                and f[1] >= 0 and isinstance(f[2], bytes) and len(f[2]) == 32 for f in files)):
            raise UpdateRefused("malformed", "the manifest's file list is not [path, size, "
                                "sha256] entries inside the slot")
        impl = sys.implementation
        mpy = getattr(impl, "_mpy", 0)
        arch = (mpy >> 10) & 0x0F
        here = [mpy & 0xFF, (mpy >> 8) & 3, ARCHES[arch] if arch < len(ARCHES) else None]
        if self.board is not None and self.board not in (m.get("boards") or ()):
            raise UpdateRefused("wrong_board", "the bundle is for %s, this node is a %s"
                                % (", ".join(m.get("boards") or ["no board"]), self.board))
        if m.get("mpy") != here:
            raise UpdateRefused("wrong_board", "the bundle's code is .mpy %s, this node "
                                "runs %s: build it for this board" % (m.get("mpy"), here))
        if tuple(impl.version[:3]) < tuple(m.get("micropython") or (0,)):
            raise UpdateRefused("wrong_board", "the bundle needs MicroPython %s: flash a "
                                "newer image over the cable" % (m.get("micropython"),))
        new, old = _version(m.get("version")), _version(version.VERSION)
        if new == old or (new < old and not downgrade):
            raise UpdateRefused("not_newer", "the node runs %s, the bundle is %s (a "
                                "downgrade must be built with --downgrade)"
                                % (version.VERSION, m.get("version")))
        values = state()
        if values.get("failed") == m.get("version"):
            raise UpdateRefused("failed_trial", "%s failed its trial boot here (%s): fix it "
                                "and build it as a newer version" % (m.get("version"),
                                                                      values.get("why")))
        need = sum(f[1] for f in files) + fsutil.RESERVE_BYTES
        free = self._free_bytes()
        if free is not None and free < need:
            raise UpdateRefused("no_room", "%d bytes free on the flash, the update needs %d"
                                % (free, need))

    def _free_bytes(self):
        """Free bytes where the slot goes, counting what an old update there holds."""
        try:
            st = os.statvfs(self.slot[:self.slot.rfind("/")] or "/")
        except OSError:
            return None
        return st[0] * st[3] + self._slot_bytes()

    def _slot_bytes(self):
        total = 0
        for path in _walk(self.slot):
            total += os.stat(path)[6]
        return total

    def _clear(self):
        """Empty the slot (an older or half-written update)."""
        for path in _walk(self.slot):
            os.remove(path)
        for folder in sorted(_folders(self.slot), key=len, reverse=True):
            os.rmdir(folder)

    def offset(self):
        """How many of the bundle's bytes the slot holds: where the download goes on."""
        at = 0
        for path, size, _ in self.files:
            try:
                held = os.stat(fsutil.join(self.slot, path))[6]
            except OSError:
                return at
            if held < size:
                return at + held
            at += size
        return at

    def write(self, offset, data):
        """Add `data`, the bundle's bytes from `offset` (which must be offset()); returns
        the new offset."""
        if self.manifest is None:
            raise UpdateRefused("out_of_order", "no manifest yet: begin() first")
        at = self.offset()
        if offset != at:
            raise UpdateRefused("out_of_order", "the slot holds %d bytes, this chunk starts "
                                "at %d: send from %d" % (at, offset, at))
        view = memoryview(data)
        start = 0
        for path, size, _ in self.files:
            if not view:
                break
            if at >= start + size:
                start += size
                continue
            take = min(len(view), start + size - at)
            target = fsutil.join(self.slot, path)
            fsutil.makedirs(target[:target.rfind("/")])
            with open(target, "ab") as f:
                f.write(view[:take])
            view = view[take:]
            at += take
            start += size
        if view:
            raise UpdateRefused("out_of_order", "%d bytes past the bundle's end" % len(view))
        return at

    def finish(self):
        """finish_steps() run at once (tests, a technician's session)."""
        return ec.finish(self.finish_steps())

    def finish_steps(self, faults=()):
        """Check every file's hash, a step per file (node.signer runs them beside the
        audio), then try the slot at the next boot; the version. A file that does not
        match goes, with every file after it (the download goes on from its start), and
        UpdateRefused says so. `faults`: the sensors failing now (trial_faults())."""
        if self.manifest is None or self.offset() < sum(f[1] for f in self.files):
            raise UpdateRefused("nothing_to_finish", "the slot does not hold the whole bundle")
        for n, (path, _, digest) in enumerate(self.files):
            yield
            if _hash(fsutil.join(self.slot, path)) != digest:
                for later, _, _ in self.files[n:]:   # the slot keeps a prefix of the bundle
                    os.remove(fsutil.join(self.slot, later))
                raise UpdateRefused("bad_file", "%s does not match the manifest: it is "
                                    "fetched again from offset %d" % (path, self.offset()))
        _save({"state": "trial", "boots": 0, "slot": self.slot, "prev": running_slot(),
               "version": self.manifest["version"], "from": version.VERSION,
               "failed": state().get("failed"), "faults": list(faults)})
        return self.manifest["version"]


def _hash(path):
    h = sha256()
    piece = bytearray(PIECE)
    with open(path, "rb") as f:
        while True:
            n = f.readinto(piece)
            if not n:
                return h.digest()
            h.update(memoryview(piece)[:n])


def _folders(top):
    if not fsutil.exists(top):
        return []
    found = [top]
    for entry in os.ilistdir(top):
        if entry[1] == 0x4000:
            found += _folders(fsutil.join(top, entry[0]))
    return found


def _walk(top):
    """Every file under `top`."""
    files = []
    for folder in _folders(top):
        for entry in os.ilistdir(folder):
            if entry[1] != 0x4000:
                files.append(fsutil.join(folder, entry[0]))
    return files

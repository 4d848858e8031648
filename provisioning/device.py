"""A raw-REPL session with a board's MicroPython, over mpremote's serial transport.

Everything the host asks the node (probe, file hashes, writes, keys, self-test)
goes through one `Session`: every read has a timeout, and a board that answers
with the ROM boot loop, download mode or nothing at all gets an error that says
which of those it is and what to do.
"""

from __future__ import annotations

import binascii
import json
import struct
import time
from functools import cache
from importlib import resources
from typing import Any

import serial
from mpremote.transport import TransportError, TransportExecError
from mpremote.transport_serial import SerialTransport

from . import ports
from .errors import DeviceError, NoMicroPython, PortError, ProvisionError

RAW_PROMPT = b"raw REPL; CTRL-B to exit\r\n"
BOOT_LOG = b"entry 0x"  # the second-stage bootloader's last line before MicroPython
CHUNK = 3072  # bytes of file data per exec: small enough for a 110 KB heap
ON_BOARD = "on_board"  # the MicroPython scripts this module runs (provisioning/on_board/)

# The node's watchdog (machine.WDT) runs on across the soft resets a session makes (the
# ESP32 port cannot stop it): right after the raw REPL is entered, the session sets the
# one dog to SESSION_WDT_MS and feeds it by setting it again every WDT_FEED_EVERY_S
# (WDT() reconfigures the dog and starts its timer again). On a board with no dog
# running this arms one: the session's final reset (machine.reset) stops it, and a
# session that ends without a reset hands the board back with HANDBACK_WDT_MS, so a
# node whose app it stopped reboots into the app about as soon as the app's own dog
# would have rebooted it. docs/decisions.md, "Watchdog and the tools".
SESSION_WDT_MS = 600_000
WDT_FEED_EVERY_S = 60.0
HANDBACK_WDT_MS = 30_000
WDT_GUARD = f"import machine\nmachine.WDT(timeout={SESSION_WDT_MS})\n"

# Signs in the console output of what the board is doing instead of running MicroPython
ROM_LOOP_SIGNS = (b"invalid header", b"flash read err", b"ets_main.c", b"No bootable app")
DOWNLOAD_SIGNS = (b"waiting for download",)


class Session:
    """Open with `Session(port)`; use as a context manager so the port is always released."""

    def __init__(self, port: str, timeout: float = 10.0, soft_reset: bool = True):
        self.port = port
        self.timeout = timeout
        self._dog_set_at: float | None = None  # when the session last set the dog
        self._at_prompt = False     # the board waits at the raw prompt (nothing half sent)
        self._reset_done = False
        ports.check_port(port)
        try:
            self.t = SerialTransport(port, baudrate=115200, timeout=timeout,
                                     exclusive=not ports.is_url(port))
        except TransportError:
            raise self._diagnose_open() from None
        try:
            self._enter_raw(soft_reset)
        except BaseException:
            self.close()
            raise

    def _diagnose_open(self) -> PortError:
        try:
            ports.open_serial(self.port).close()
        except PortError as exc:
            return exc
        return PortError(f"cannot open {self.port}", "re-plug the board and try again")

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        t = getattr(self, "t", None)
        if t is None:
            return
        self._hand_back_dog()
        try:
            if t.in_raw_repl:
                t.serial.write(b"\r\x02")  # back to the friendly REPL
            t.serial.close()
        except (OSError, serial.SerialException):
            pass
        self.t = None

    # --- raw REPL ------------------------------------------------------------------
    def _read_until(self, ending: bytes, timeout: float, bail: bool = False) -> bytes:
        """Read up to `ending`; with bail, stop early on a ROM boot loop or download mode."""
        s = self.t.serial
        data = b""
        deadline = time.monotonic() + timeout
        while not data.endswith(ending) and time.monotonic() < deadline:
            if bail and len(data) > 40 and any(sign in data for sign in
                                               ROM_LOOP_SIGNS + DOWNLOAD_SIGNS):
                break
            try:
                waiting = s.in_waiting
                chunk = s.read(1) if waiting or self.t.is_pty else b""  # never past `ending`
            except (OSError, serial.SerialException) as exc:
                raise ports.open_error(self.port, exc) from None
            if chunk:
                data += chunk
            else:
                time.sleep(0.01)
        return data

    def _enter_raw(self, soft_reset: bool) -> None:
        """mpremote's enter_raw_repl, plus what a technician needs from it: a second
        Ctrl-C for an asyncio app's cleanup, a board that resets under us (its watchdog)
        interrupted again, and on failure the console read back to say what the board
        is doing instead (ROM boot loop, download mode, other firmware) rather than
        mpremote's print of the raw bytes."""
        s = self.t.serial
        try:
            s.write(b"\r\x03")
            time.sleep(0.05)
            s.write(b"\x03")  # a second Ctrl-C stops an asyncio app's cleanup too
            seen = self._read_until(b"\x00never", 0.2)
            s.write(b"\r\x01")
        except (OSError, serial.SerialException) as exc:
            raise ports.open_error(self.port, exc) from None
        seen += self._read_until(RAW_PROMPT + b">", self.timeout, bail=True)
        if not seen.endswith(RAW_PROMPT + b">") and BOOT_LOG in seen:
            # the board reset under us (its app, a watchdog): interrupt the fresh boot
            time.sleep(0.5)
            s.write(b"\r\x03\x03\r\x01")
            seen = self._read_until(RAW_PROMPT + b">", self.timeout, bail=True)
        if not seen.endswith(RAW_PROMPT + b">"):
            raise self._not_a_repl(seen)
        self.t.in_raw_repl = True
        # the app's dog runs on (a soft reset does not stop it): set it long, at once,
        # in what is left of the app's heap; again after the soft reset if that failed
        self._set_dog(SESSION_WDT_MS, prompt_waiting=False)
        if soft_reset:
            self._at_prompt = False
            s.write(b"\x04")  # soft reset in raw mode: fresh heap, main.py does not run
            seen = self._read_until(b"soft reboot\r\n", self.timeout)
            seen += self._read_until(RAW_PROMPT, self.timeout)  # '>' is left for exec
            if not seen.endswith(RAW_PROMPT):
                raise self._not_a_repl(seen)
        self._at_prompt = True
        if self._dog_set_at is None:
            self._set_dog(SESSION_WDT_MS)

    # --- the node's watchdog -------------------------------------------------------
    def _set_dog(self, timeout_ms: int, prompt_waiting: bool = True) -> bool:
        """machine.WDT(timeout=timeout_ms) on the board: (re)configures the one dog and
        starts its timer again. Best effort: a board without machine.WDT has no dog to
        fear, and a failure here shows up as the error of the step that follows."""
        code = WDT_GUARD.replace(str(SESSION_WDT_MS), str(timeout_ms)).encode()
        try:
            _, err = self._exec_raw(code, min(self.timeout, 5.0), prompt_waiting)
        except (TransportError, serial.SerialException, OSError, struct.error):
            return False
        if err:
            return False
        self._dog_set_at = time.monotonic()
        return True

    def _feed_dog(self) -> None:
        """Set the dog again once WDT_FEED_EVERY_S have passed since the last time, so a
        long session is never bitten (each exec must end within SESSION_WDT_MS)."""
        if self._dog_set_at is not None and \
                time.monotonic() - self._dog_set_at > WDT_FEED_EVERY_S:
            self._set_dog(SESSION_WDT_MS)

    def _hand_back_dog(self) -> None:
        """A session that did not reset the board leaves it with HANDBACK_WDT_MS."""
        if self._dog_set_at is not None and self._at_prompt and not self._reset_done:
            self._set_dog(HANDBACK_WDT_MS)

    def fresh(self, crypto: bool = True) -> None:
        """Soft reset inside the raw REPL: a clean heap before a memory-hungry step.

        A 110 KB ESP32 heap holds the P-256 code once, not the key step, the
        self-test and the receipt together; with crypto, the P-256 base-point
        table (16 blocks of 1 KB) is built first, before the heap fragments.
        """
        self._set_dog(SESSION_WDT_MS)  # fed now, in the heap the soft reset clears
        try:
            self._at_prompt = False
            self.t.serial.write(b"\x04")
        except (OSError, serial.SerialException) as exc:
            raise ports.open_error(self.port, exc) from None
        seen = self._read_until(b"soft reboot\r\n", self.timeout)
        seen += self._read_until(RAW_PROMPT, self.timeout)
        if not seen.endswith(RAW_PROMPT):
            raise self._not_a_repl(seen)
        self._at_prompt = True
        if crypto:
            self.run("precompute", what="preparing the P-256 table")

    def _not_a_repl(self, seen: bytes) -> Exception:
        if any(sign in seen for sign in ROM_LOOP_SIGNS):
            return NoMicroPython(
                f"no MicroPython on {self.port}: the board shows the ROM boot error loop "
                "(blank or erased flash)",
                "flash MicroPython first: citynode-provision flash --port PORT --board BOARD "
                "(or run provision, which flashes)")
        if any(sign in seen for sign in DOWNLOAD_SIGNS):
            return DeviceError(f"{self.port}: the board is in ROM download mode",
                               "release BOOT and press EN (reset), then try again")
        if b"running '" in seen:
            return NoMicroPython(f"{self.port}: the board runs other firmware, not MicroPython",
                                 "flash MicroPython with citynode-provision flash")
        if not seen.strip(b"\r\n\x00"):
            return PortError(f"no answer from the board on {self.port} within {self.timeout:g} s",
                             "check the cable and power, press EN (reset) and try again")
        tail = seen[-120:].decode(errors="replace").strip()
        return DeviceError(f"{self.port}: the board does not offer a MicroPython REPL "
                           f"(it printed: {tail!r})",
                           "press EN (reset); if it persists, re-flash with "
                           "citynode-provision flash")

    def exec(self, code: str, timeout: float | None = None, what: str = "command") -> str:
        """Run code in the raw REPL and return its stdout; errors raise with the board's message."""
        self._feed_dog()
        try:
            out, err = self._exec_raw(code.encode(), timeout or self.timeout)
        except (TransportError, serial.SerialException, OSError, struct.error) as exc:
            raise self._link_lost(what, exc) from None
        if err:
            lines = err.decode(errors="replace").strip().splitlines()
            raise DeviceError(f"{what} failed on the board: {lines[-1] if lines else err!r}",
                              "see the message above; re-deploy the firmware if a module is "
                              "missing") from None
        return out.decode(errors="replace")

    def _link_lost(self, what: str, exc: Exception) -> PortError:
        return PortError(f"the board on {self.port} stopped answering during {what} ({exc})",
                         "check cable and power, then run the same command again: it "
                         "resumes where it stopped")

    def _exec_raw(self, code: bytes, timeout: float,
                  prompt_waiting: bool = True) -> tuple[bytes, bytes]:
        """mpremote's exec_raw with our timeout on every wait (its prompt wait is fixed at
        10 s); prompt_waiting=False when the caller has already read the '>'."""
        t = self.t
        self._at_prompt = False
        if prompt_waiting and not t.read_until(1, b">", timeout=timeout).endswith(b">"):
            raise TransportError("no raw REPL prompt")
        t.serial.write(b"\x05A\x01")  # raw-paste: flow-controlled, MicroPython >= 1.14
        if t.serial.read(2) != b"R\x01":
            raise TransportError("the board does not accept raw-paste (MicroPython too old?)")
        t.raw_paste_write(code)
        result = t.follow(timeout)
        self._at_prompt = True
        return result

    def exec_json(self, code: str, timeout: float | None = None, what: str = "command") -> Any:
        """Run code whose last line of output is JSON; that value."""
        out = self.exec(code, timeout, what)
        try:
            return last_json(out)
        except ValueError as exc:
            raise DeviceError(f"{what}: {exc}", "re-deploy the firmware and re-run") from None

    def run(self, *scripts: str, what: str, timeout: float | None = None, **args: Any) -> Any:
        """Run on_board scripts (concatenated, in order) with `ARGS` = args; their JSON."""
        code = f"import json\nARGS = json.loads({json.dumps(args)!r})\n"
        return self.exec_json(code + "".join(map(script, scripts)), timeout, what)

    # --- what the node is --------------------------------------------------------
    def probe(self) -> dict[str, Any]:
        """MicroPython version, .mpy ABI, MAC-derived identity, config and provisioning state."""
        return self.run("probe", what="probe")

    # --- files ---------------------------------------------------------------------
    def hashes(self, paths: list[str]) -> dict[str, str | None]:
        """sha256 hex of each file on the board (None when missing), in one round trip."""
        return self.run("file_hash", "hashes", paths=paths, timeout=30, what="hashing files")

    def write_file(self, path: str, data: bytes) -> None:
        """Write through `<path>.part` and rename, so a cut never leaves a half file."""
        parent = path.rsplit("/", 1)[0]
        if parent:
            self.run("make_dirs", dir=parent, what=f"making {parent}")
        part = path + ".part"
        self._feed_dog()
        self._at_prompt = False
        try:
            self.t.fs_writefile(part, data, chunk_size=CHUNK)
        except TransportExecError as exc:
            raise DeviceError(f"writing {path} failed on the board: {exc.error_output.strip()}",
                              "check the board's free space (a full filesystem)") from None
        except (TransportError, serial.SerialException, OSError) as exc:
            raise self._link_lost(f"writing {path}", exc) from None
        self._at_prompt = True
        self.run("place_file", part=part, path=path, what=f"writing {path}")

    def write_romfs(self, image: bytes) -> None:
        """Write a ROMFS image into the board's ROMFS partition, as `mpremote romfs
        deploy` does (vfs.rom_ioctl: erase the blocks, write them); /rom is unmounted
        first and mounted again by the next boot."""
        info = self.exec_json("import vfs\ntry:\n vfs.umount('/rom')\nexcept OSError:\n pass\n"
                              "dev=vfs.rom_ioctl(2,0)\n"
                              "print([dev.ioctl(4,0),dev.ioctl(5,0)])", what="finding ROMFS")
        blocks, block = info
        if len(image) > blocks * block:
            raise DeviceError(f"the firmware image ({len(image)} bytes) is larger than the "
                              f"board's ROMFS partition ({blocks * block} bytes)",
                              "flash a MicroPython image with a larger romfs partition")
        for n in range((len(image) + block - 1) // block):
            self.exec(f"dev.ioctl(6,{n})", what="erasing ROMFS")
        for at in range(0, len(image), CHUNK):
            chunk = binascii.b2a_base64(image[at:at + CHUNK], newline=False)
            self.exec(f"import binascii\ndev.writeblocks({at // block},"
                      f"binascii.a2b_base64({chunk!r}),{at % block})", what="writing ROMFS")

    def remove(self, paths: list[str]) -> None:
        """Remove files, then the folders they leave empty (an empty `node/` on the
        filesystem would shadow the ROMFS package of that name)."""
        dirs = sorted({p.rsplit("/", 1)[0] for p in paths if p.count("/") > 1},
                      key=lambda d: -d.count("/"))
        if paths:
            self.run("remove", files=paths, dirs=dirs, what="removing files")

    def reset(self) -> None:
        """Hard reset through MicroPython (works where DTR/RTS do not reach EN).

        The firmware counts every boot as a possible crash until the app has run
        healthy for two minutes (node/safemode.py); a technician's deliberate reset
        clears that count first, so a few provisioning commands in a row never
        push a good node into safe mode.
        """
        try:
            self.run("deliberate_reset", what="clearing the crash counter")
        except ProvisionError:
            pass
        self._reset_done = True  # a hard reset stops the dog the session set
        try:
            self.t.exec_raw_no_follow("import machine\nmachine.reset()")
        except (TransportError, serial.SerialException, OSError):
            pass
        self.close()


@cache
def script(name: str) -> str:
    """The text of a MicroPython script in provisioning/on_board/ (package data)."""
    return (resources.files(__package__) / ON_BOARD / f"{name}.py").read_text()


def last_json(output: str) -> Any:
    """The JSON value on the last non-empty line a board printed (ValueError if none):
    how every host program reads what a script on a board reports."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    if not lines:
        raise ValueError("the board printed nothing")
    try:
        return json.loads(lines[-1])
    except ValueError:
        raise ValueError(f"the board printed no JSON ({lines[-1][:120]!r})") from None

"""What the servers that tests and the demo start have in common (Mosquitto, chronyd):
one process, its log, a stop that waits for a clean exit and kills what does not."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path


class LocalServer:
    proc: subprocess.Popen | None = None
    log_path: Path

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the server saves what it keeps), SIGKILL after `timeout`."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: what a power cut does to the process."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def log(self) -> str:
        """The end of the server's log, for assertion and error messages."""
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no log)"

    def __exit__(self, *exc: object) -> None:
        self.stop()

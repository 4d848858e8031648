"""Helpers for the provisioning tests: the CLI as a technician runs it, images, firmware trees."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from citynode.testing.emulator import FIRMWARE, VENV_BIN

PASSWORD = "pole-wifi-Secr3t-7d1f"

def firmware_tree(tmp: Path) -> Path:
    """A copy of firmware/ (some tests change it) that the provisioning tests deploy."""
    fw = tmp / "fw"
    if not fw.exists():
        shutil.copytree(FIRMWARE, fw, ignore=shutil.ignore_patterns("__pycache__"))
    return fw


def make_image(tmp: Path, board: str = "esp32-devkitc") -> Path:
    out = tmp / f"mp-{board}.bin"
    if not out.exists():
        subprocess.run([str(VENV_BIN / "citynode-emu"), "image", "--board", board, "-o", str(out)],
                       check=True, capture_output=True)
    return out


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def events(self) -> list[dict]:
        return [json.loads(ln) for ln in self.stdout.splitlines() if ln.startswith("{")
                and '"result"' not in ln[:12]]

    @property
    def result(self) -> dict:
        for ln in reversed(self.stdout.splitlines()):
            if ln.startswith('{"result"'):
                return json.loads(ln)["result"]
        raise AssertionError(f"no result line in:\n{self.stdout}\n{self.stderr}")


def cli(*args: str, logs: Path | None = None, timeout: float = 240, env: dict | None = None
        ) -> Run:
    """Run citynode-provision as a technician would; stdout/stderr also kept in `logs`."""
    proc = subprocess.run([str(VENV_BIN / "citynode-provision"), *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
        n = len(list(logs.glob("*.out")))
        (logs / f"{n:02d}-{args[0]}.out").write_text(proc.stdout)
        (logs / f"{n:02d}-{args[0]}.err").write_text(proc.stderr)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def provision_args(ports: list[str], registry: Path, fw: Path, pwfile: Path,
                   image: Path | None = None, *extra: str) -> list[str]:
    args = ["provision"]
    for port in ports:
        args += ["--port", port]
    args += ["--board", "esp32-devkitc", "--registry", str(registry), "--site", "test",
             "--pole", "P-1", "--broker", "127.0.0.1:1883", "--wifi-ssid", "city",
             "--wifi-password-file", str(pwfile), "--firmware-dir", str(fw), "--json"]
    if image is not None:
        args += ["--image", str(image)]
    return args + list(extra)


def password_file(tmp: Path) -> Path:
    path = tmp / "wifi.pw"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


def operator_key(tmp: Path):
    """The operator's downlink key: (private key, its public PEM file for provisioning)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp / "operator.pub.pem"
    pem.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, pem


def ops_init(tmp: Path, city: tuple[str, int] = ("127.0.0.1", 1883)):
    """The operator's downlink key, made as an operator makes it (`citynode-ops init`, in
    tmp/ops, reaching the city broker `city`): (private key, its public PEM file, which
    provisioning puts on the nodes and the gateway is given)."""
    from cryptography.hazmat.primitives import serialization

    from citynode.testing.gateway import PREFIX

    home = tmp / "ops"
    run = subprocess.run([str(VENV_BIN / "citynode-ops"), "--home", str(home), "init",
                          "--broker", f"{city[0]}:{city[1]}", "--no-tls", "--prefix", PREFIX,
                          "--registry", str(tmp / "fleet"), "--json"],
                         capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        raise RuntimeError(f"citynode-ops init failed:\n{run.stdout}\n{run.stderr}")
    key = serialization.load_pem_private_key((home / "operator.key.pem").read_bytes(), None)
    return key, home / "operator.pub.pem"


def provision_one(tmp: Path, port: str, broker: str, window_s: int, operator_pem: Path,
                  board: str = "esp32-devkitc", flash: bool = True,
                  ntp: str | None = None) -> str:
    """One board provisioned as a technician does it (flash unless `flash` is False: a
    board that has MicroPython; deploy, keys, registry in tmp/fleet, verified self-test);
    returns its device id."""
    return provision_boards(tmp, [port], broker, window_s, operator_pem, board, flash,
                            ntp)[0]


def provision_boards(tmp: Path, ports: list[str], broker: str, window_s: int,
                     operator_pem: Path, board: str = "esp32-devkitc", flash: bool = True,
                     ntp: str | None = None, pole: str = "B-1") -> list[str]:
    """provision_one() for boards on `ports`, in one `citynode-provision` run (it takes
    them in parallel), all on `pole`; their device ids, in the ports' order."""
    args = ["provision", *[a for port in ports for a in ("--port", port)], "--board", board,
            "--registry", str(tmp / "fleet"), "--site", "bench", "--pole", pole,
            "--broker", broker, "--wifi-ssid", "city",
            "--wifi-password-file", str(password_file(tmp)), "--window-s", str(window_s),
            "--operator-key", str(operator_pem), "--json", *(["--ntp", ntp] if ntp else [])]
    args += ["--image", str(make_image(tmp, board))] if flash else ["--no-flash"]
    run = cli(*args, logs=tmp / "logs", timeout=600)
    if run.code != 0:
        raise RuntimeError(f"provisioning failed ({run.code}):\n{run.stdout}\n{run.stderr}")
    by_port = {b["port"]: b["device"] for b in run.result["boards"]}
    return [by_port[port] for port in ports]

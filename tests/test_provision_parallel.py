"""Several boards at once, and a run cut by a power loss in the middle of deploy."""

from __future__ import annotations

from citynode.boards import get_board
from citynode.provisioning import provision
from citynode.provisioning.events import Event, Events
from citynode.registry import load_registry
from citynode.testing.emulator import start_emulator
from citynode.testing.provisioning import (
    PASSWORD,
    cli,
    firmware_tree,
    make_image,
    password_file,
    provision_args,
)


def test_four_blank_boards_in_parallel_then_rerun_changes_nothing(tmp_path):
    emu = start_emulator(tmp_path, count=4, blank=True)
    try:
        urls = [b.url for b in emu.boards]
        args = provision_args(urls, tmp_path / "fleet", firmware_tree(tmp_path),
                              password_file(tmp_path), make_image(tmp_path))
        first = cli(*args, timeout=280)
        assert first.code == 0, first.stdout[-3000:] + first.stderr
        boards = first.result["boards"]
        assert [b["port"] for b in boards] == urls
        assert all(b["status"] == "provisioned" and b["steps"]["flash"] == "flashed"
                   for b in boards)
        devices = {f"cn-{b.mac}" for b in emu.boards}
        assert {b["device"] for b in boards} == devices
        assert set(load_registry(tmp_path / "fleet", strict=True).records) == devices
        # events are tagged per port, and every port reached "done"
        done = {e["port"] for e in first.events if e["step"] == "done"}
        assert done == set(urls)

        again = cli(*args)
        assert again.code == 0
        assert again.result["unchanged"] is True
        assert all(b["status"] == "unchanged" for b in again.result["boards"])
    finally:
        emu.stop()


def test_power_cut_mid_deploy_then_resume(tmp_path):
    emu = start_emulator(tmp_path)  # a board with MicroPython: no flashing needed here
    board = emu.boards[0]
    try:
        opts = provision.Options(
            board=get_board("esp32-devkitc"), registry=tmp_path / "fleet", site="test",
            pole="P-9", broker="127.0.0.1:1883", wifi_ssid="city", wifi_password=PASSWORD,
            firmware_dir=firmware_tree(tmp_path), timeout=3.0, technician="test")
        written: list[str] = []

        def cut_power(event: Event) -> None:
            if event.step == "deploy" and event.state == "progress":
                written.append(event.message)
                if len(written) == 2:   # two of the firmware's files are in
                    board.control("power", on=False)

        events = Events([cut_power])
        first = provision.provision_one(opts, board.url, events.for_port(board.url))
        assert first.status == "failed", first
        assert first.error and first.error["error"] == "port"
        assert "stopped answering" in first.error["message"]
        assert "resumes" in first.error["fix"]
        assert len(written) == 2
        assert not (tmp_path / "fleet" / f"cn-{board.mac}.json").exists()
        fs = board.state / "fs"
        assert not (fs / "provisioned.json").exists()

        board.control("power", on=True)
        resumed: list[Event] = []
        second = provision.provision_one(opts, board.url,
                                         Events([resumed.append]).for_port(board.url))
        assert second.status == "provisioned", second
        copied = [e for e in resumed if e.step == "deploy" and e.state == "progress"]
        total = next(e for e in resumed if e.step == "deploy" and e.state == "start")
        # only what the cut left missing is copied again: "N of M files to copy", N < M
        todo, _, rest = total.message.partition(" of ")
        assert 0 < int(todo) == len(copied) < int(rest.split()[0])
        assert not any(e.message in written[:1] for e in copied)   # not written twice
        assert (fs / "provisioned.json").exists()
        assert not list(fs.rglob("*.part"))

        third = provision.provision_one(opts, board.url, Events().for_port(board.url))
        assert third.status == "unchanged"
    finally:
        emu.stop()

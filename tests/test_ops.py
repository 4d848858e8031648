"""citynode-ops on the operator's machine: the operator's folder (key, settings, command
numbers) and the checks made before anything is signed. Against a node through a real
gateway: hil_tests/test_ops.py."""

from __future__ import annotations

import json
import multiprocessing
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from citynode import wire
from citynode.mosquitto import Mosquitto, free_port
from citynode.ops import commands
from citynode.ops.cli import main
from citynode.ops.home import OpsError, OpsHome


def ops(capsys, *args: str) -> tuple[int, dict]:
    code = main([*args, "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])["result"]


def test_init_makes_a_private_key_only_the_operator_reads_and_never_replaces_it(tmp_path,
                                                                                capsys):
    home = tmp_path / "ops"
    code, result = ops(capsys, "--home", str(home), "init", "--broker", "127.0.0.1:1883",
                       "--no-tls")
    assert code == 0 and result["created"]
    key = home / "operator.key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "ops.toml").stat().st_mode) == 0o600
    first = key.read_bytes()
    # run again (new settings): the key stays, every node provisioned with it still obeys
    code, result = ops(capsys, "--home", str(home), "init", "--broker", "city.example:8883")
    assert code == 0 and not result["created"] and key.read_bytes() == first
    assert OpsHome(home).settings().host == "city.example"
    # the public half printed is the private key's
    assert main(["--home", str(home), "key"]) == 0
    printed = serialization.load_pem_public_key(capsys.readouterr().out.encode())
    private = serialization.load_pem_private_key(first, None)
    assert printed.public_numbers() == private.public_key().public_numbers()


def test_a_key_others_can_read_is_refused_with_the_fix(tmp_path, capsys):
    home = OpsHome(tmp_path / "ops")
    home.create_key()
    (home.path / "operator.key.pem").chmod(0o644)
    with pytest.raises(OpsError, match="chmod 600"):
        home.key()
    with pytest.raises(OpsError, match="exists"):
        home.create_key()


@pytest.mark.parametrize("name, words, says", [
    ("lamp", ["level=150"], "0..100"),
    ("lamp", ["level=half"], "whole number"),
    ("lamp", [], "needs level"),
    ("lamp", ["brightness=3"], "takes level="),
    ("set_interval", ["seconds=2"], "5..3600"),
    ("reboot", ["now=1"], "no arguments"),
    ("dance", [], "one of"),
    ("set_lighting", [], "at least one of"),
    ("set_lighting", ["on_at=7pm"], "HH:MM"),
])
def test_arguments_a_node_would_refuse_are_caught_on_the_laptop(name, words, says):
    with pytest.raises(OpsError) as caught:
        commands.parse_args(name, words)
    assert says in str(caught.value)


def test_a_command_carries_its_deadline_and_verifies_with_the_public_key(tmp_path):
    home = OpsHome(tmp_path / "ops")
    home.create_key()
    key = home.key()
    data = commands.signed(key, "cn-0000000000a1", 7, "lamp", {"level": 30}, 120, now=1_800_000_000)
    opened = wire.open_command(data, key.public_key(), "cn-0000000000a1")
    assert (opened.seq, opened.name, opened.args) == (7, "lamp", {"level": 30})
    assert (opened.time, opened.expires) == (1_800_000_000, 1_800_000_120)


def _take_numbers(home: str, count: int, out) -> None:
    taken = []
    for _ in range(count):
        with OpsHome(Path(home)).numbers() as numbers:
            numbers["cn-0000000000a1"] = numbers.get("cn-0000000000a1", 0) + 1
            taken.append(numbers["cn-0000000000a1"])
    out.put(taken)


def test_two_operator_shells_at_once_never_send_the_same_number(tmp_path):
    out: multiprocessing.Queue = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_take_numbers, args=(str(tmp_path), 40, out))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    taken = [n for _ in workers for n in out.get(timeout=60)]
    for worker in workers:
        worker.join()
    assert sorted(taken) == list(range(1, 161))
    assert stat.S_IMODE((tmp_path / "seq.json").stat().st_mode) == 0o600


def test_an_unreachable_city_broker_says_where_it_looked(tmp_path, capsys):
    home = tmp_path / "ops"
    port = free_port()      # nothing listens there
    assert ops(capsys, "--home", str(home), "init", "--broker", f"127.0.0.1:{port}",
               "--no-tls")[0] == 0
    code, result = ops(capsys, "--home", str(home), "fleet")
    assert code == 3 and f"127.0.0.1:{port}" in result["message"], result


def test_the_fleet_is_what_the_gateways_announce(tmp_path, capsys):
    """The gateways' retained place packs (citynode/place.py) on a real Mosquitto."""
    import paho.mqtt.client as mqtt

    with Mosquitto(tmp_path / "city") as city:
        publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="gw")
        publisher.connect(city.host, city.port)
        publisher.loop_start()
        for gateway, device, pole in (("pole-1", "cn-0000000000a1", "P1"),
                                      ("pole-2", "cn-0000000000a2", "P2")):
            pack = json.dumps([{"bn": f"{device}/", "n": "lat", "u": "lat", "v": 48.2},
                               {"n": "lon", "u": "lon", "v": 16.3},
                               {"n": "site", "vs": "vienna"}, {"n": "pole", "vs": pole}])
            publisher.publish(f"city/x/{gateway}/meta/{device}", pack, qos=1,
                              retain=True).wait_for_publish(5)
        publisher.loop_stop()
        publisher.disconnect()
        home = tmp_path / "ops"
        ops(capsys, "--home", str(home), "init", "--broker", f"{city.host}:{city.port}",
            "--no-tls", "--prefix", "city/x")
        code, result = ops(capsys, "--home", str(home), "fleet")
        assert code == 0
        assert {(n["device"], n["gateway"], n["pole"], n["site"]) for n in result["nodes"]} == {
            ("cn-0000000000a1", "pole-1", "P1", "vienna"),
            ("cn-0000000000a2", "pole-2", "P2", "vienna")}
        code, result = ops(capsys, "--home", str(home), "send", "reboot", "--pole", "P9")
        assert code == 2 and "no node on pole 'P9'" in result["message"]


def test_a_bundle_is_built_for_the_boards_chip_and_signed_with_the_operator_key(tmp_path,
                                                                                capsys):
    from citynode.ops import bundle
    home = tmp_path / "ops"
    ops(capsys, "--home", str(home), "init", "--broker", "127.0.0.1:1883", "--no-tls")
    out = tmp_path / "update.cbor"
    code, result = ops(capsys, "--home", str(home), "bundle", "--board", "esp32-wrover-kit",
                       "--board", "esp32-s3-devkitc", "--out", str(out))
    assert code == 0 and result["boards"] == ["esp32-wrover-kit", "esp32-s3-devkitc"]
    manifest, blob = bundle.read(out.read_bytes(), OpsHome(home).key().public_key())
    assert manifest.mpy[2] == "xtensawin" and len(blob) == result["bytes"]
    assert {p for p, _, _ in manifest.files} >= {"node/app.mpy", "node/ota.mpy"}
    # one bundle cannot serve two chip families
    assert main(["--home", str(home), "bundle", "--board", "esp32-wrover-kit", "--board",
                 "esp32-c3-devkitm", "--out", str(tmp_path / "mixed.cbor")]) == 2
    assert "build one bundle per chip family" in capsys.readouterr().err
    assert not (tmp_path / "mixed.cbor").exists()
    # nor a board whose app runs from ROMFS (docs/decisions.md)
    assert main(["--home", str(home), "bundle", "--board", "esp32-devkitc",
                 "--out", str(tmp_path / "romfs.cbor")]) == 2
    assert "update it over the cable" in capsys.readouterr().err
    assert not (tmp_path / "romfs.cbor").exists()

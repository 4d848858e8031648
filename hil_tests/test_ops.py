"""citynode-ops, the operator's command line, against the node through the real gateway:
the operator's folder made by `citynode-ops init` (its public key provisioned onto the
node and given to the gateway), commands published on the city's broker, relayed by
the pole's gateway, carried out and answered by the node, answers verified with the
node's key from the registry."""

from __future__ import annotations

import json
import subprocess

import pytest

from hil_tests.bench import VENV_BIN, Bench

ANSWER_S = 40


def ops(node: Bench, *args: str, timeout: float = 120) -> tuple[int, dict]:
    """Run citynode-ops with the bench's operator folder; (exit code, its JSON result)."""
    if node.ops_home is None:
        pytest.skip("citynode-ops needs the bench's gateway and city broker (emulated bench)")
    run = subprocess.run([str(VENV_BIN / "citynode-ops"), "--home", str(node.ops_home), *args,
                          "--json"], capture_output=True, text=True, timeout=timeout)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON from citynode-ops {args}:\n{run.stdout}\n{run.stderr}"
    return run.returncode, json.loads(lines[-1])["result"]


def test_the_operator_sets_a_pole_s_lamp_and_sees_it_confirmed(node: Bench):
    code, fleet = ops(node, "fleet")
    assert code == 0 and node.device in [n["device"] for n in fleet["nodes"]], fleet
    code, result = ops(node, "send", "lamp", "level=25", "--pole", "HIL-1",
                       "--wait", str(ANSWER_S))
    assert code == 0, result
    [answer] = result["nodes"]
    assert answer["device"] == node.device and answer["result"] == "ok", answer
    assert answer["verified"] and answer["settings"]["lamp"] == 25, answer
    if node.emulated is not None:
        assert node.emulated.control("status")["peripherals"]["lamp"] == pytest.approx(0.25,
                                                                                       abs=0.01)


def test_lost_command_numbers_are_recovered_from_the_node_s_answer(node: Bench):
    # the operator's machine lost its numbers (a new laptop): the node refuses the first
    # as replayed, says its highest, and the command goes again above it
    ops(node, "send", "report_config", "--device", node.device, "--wait", str(ANSWER_S))
    (node.ops_home / "seq.json").unlink()
    code, result = ops(node, "send", "lamp", "level=60", "--device", node.device,
                       "--wait", str(ANSWER_S))
    [answer] = result["nodes"]
    assert code == 0 and answer["result"] == "ok" and answer["resent"], answer
    assert answer["settings"]["lamp"] == 60
    numbers = json.loads((node.ops_home / "seq.json").read_text())
    assert numbers[node.device] == answer["seq"] >= 2


def test_wrong_arguments_are_refused_before_anything_is_signed(node: Bench):
    before = (node.ops_home / "seq.json").read_text() if node.ops_home and \
        (node.ops_home / "seq.json").exists() else None
    code, result = ops(node, "send", "lamp", "level=150", "--device", node.device)
    assert code == 2 and "0..100" in result["message"], result
    code, result = ops(node, "send", "lamp", "level=10", "--device", "cn-000000000000")
    assert code == 2 and "citynode-ops fleet" in result["fix"], result
    after = (node.ops_home / "seq.json").read_text() if (node.ops_home / "seq.json").exists() \
        else None
    assert after == before                  # no number was used up


def test_a_node_off_the_air_is_reported_as_not_answering(node: Bench):
    board = node.require_emulator("takes the node's Wi-Fi down")
    board.control("wifi", up=False)
    try:
        code, result = ops(node, "send", "report_config", "--device", node.device,
                           "--wait", "8")
    finally:
        board.control("wifi", up=True)
    [answer] = result["nodes"]
    assert code == 4 and answer["result"] == "no_answer", result

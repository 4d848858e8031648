"""The audio, impulse and downlink tests again, on a node that runs at the chip's speed
(issue 11; the `chip_bench` fixture). At host speed the firmware's compute is ~60x
faster than a devkitc's, so a signature that holds the chip's event loop for ~0.4 s
passes unnoticed; here it takes its chip time against the real-time microphone.

The speed targets (an event within 250 ms, no audio lost, no loop stall over 20 ms)
are the benchmark's (`make bench-firmware`, chip-speed run): here only what must hold
on any board, however loaded, and on any host (a fast host's large factor charges
the host's own per-wake-up costs at it: docs/decisions.md, "Host dependence").
"""

from __future__ import annotations

from hil_tests.bench import Bench
from hil_tests.test_impulse import fire_impulse
from hil_tests.test_sensors import check_sound_window
from hil_tests.test_uplink import check_downlink

STAMP_S = 0.05    # the onset by the chunk's read time, and the clock: +3 ms measured
SHOTS = 6         # fired again while not heard, or its onset lost (5 were, once)


def test_chip_speed_window_carries_sound_levels(chip_node: Bench):
    check_sound_window(chip_node, timeout=6 * chip_node.window_s + 60)


def test_chip_speed_impulse_reported_and_stamped_when_it_happened(chip_bench: Bench):
    """A gunshot at the chip-speed node comes as an event, stamped at its onset's
    sample on the node's synced clock: within STAMP_S, and the clock's own uncertainty,
    of the emulator's truth (the clock's error at chip speed is the benchmark's
    clock_error_ms_p95_chip). How soon (target 250 ms) is the benchmark's
    impulse_to_publish_ms_chip; how much audio the node still drops, and so how many
    shots it misses, its audio_lost_pct (issue 11): here up to SHOTS shots."""
    chip_bench.boot_app(timeout=120)
    delay, stamp_error, rtt = fire_impulse(chip_bench, shots=SHOTS, stamp_s=STAMP_S)
    print(f"chip speed: impulse delay {delay:.3f} s, stamp error {stamp_error:+.3f} s, "
          f"clock round trip {rtt:.3f} s")
    # the chip-speed VM is stopped in grains of ~70 ms of chip time (300 us bursts at
    # x235, longer on a loaded host): one between an SNTP answer's arrival and its
    # reading skews the clock by up to half the round trip the node itself reports
    # (a CI run: -63 ms)
    bound = STAMP_S + rtt / 2
    assert abs(stamp_error) <= bound, f"the event's stamp is {stamp_error:+.3f} s off"


def test_chip_speed_downlink_obeys_the_operator_key_only_once(chip_node: Bench):
    """Each answer is a verify and a signature in steps beside the audio: 9-15 s on
    the emulated chip in the benchmark (downlink_to_answer_ms_chip says how fast), over
    60 s in a CI run on three workers since the chip's clock keeps the signer to its
    12 ms turns; here only that the node obeys once and refuses the rest."""
    check_downlink(chip_node, answer_s=120)

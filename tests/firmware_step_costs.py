"""What each step of the node's P-256 work costs, measured on the MicroPython unix port.

    .venv/bin/python -m tests.firmware_step_costs [--reps 7]

For each operation node.signer runs in steps: the number of steps, the longest step
(per step, the fastest of `reps` runs, so the figure is the step's own cost and not
the host's scheduling noise or a garbage collection), the total, and the heap it
holds at its peak (collected after every step) beyond what was live before. In chip
terms: x150 for interpreted Python, x100 where big-integer arithmetic dominates (every
point operation and inversion step; the brief of issue 11). Also: signing with a pool
pair, a whole event envelope built with one, the table's and the pool's heap, and the
crypto modules' bytecode. 64-bit unix-port heap figures are halved for the chip (GC
blocks are counted in machine words), as docs/decisions.md does.
"""

from __future__ import annotations

import argparse
import json

from citynode.testing.micropython import run_micropython_json

SCRIPT = r"""
import gc, json, time
from hashlib import sha256
from node import cose, ec, p256, payload, seqno
REPS = __REPS__


def once(steps, live):
    ts = []
    peak = 0
    while True:
        t = time.ticks_us()
        try:
            next(steps)
            done = False
        except StopIteration:
            done = True
        ts.append(time.ticks_diff(time.ticks_us(), t))
        if live is not None:
            gc.collect()
            peak = max(peak, gc.mem_alloc() - live)
        if done:
            return ts, peak


def measure(make, reset=None):
    best = None
    for _ in range(REPS):
        if reset:
            reset()
        gc.collect()
        ts, _ = once(make(), None)
        best = ts if best is None else [min(a, b) for a, b in zip(best, ts)]
    if reset:
        reset()
    gc.collect()
    _, peak = once(make(), gc.mem_alloc())
    return {"steps": len(best), "max_step_us": max(best), "total_ms": sum(best) / 1000,
            "peak_heap": peak}


def timed(fn, n=200):
    fn()
    best = 1 << 30
    for _ in range(n):
        t = time.ticks_us()
        fn()
        best = min(best, time.ticks_diff(time.ticks_us(), t))
    return best


def fresh_table():
    ec.set_comb_teeth(ec.TEETH)


priv = b'\x07' * 32
digest = sha256(b'm').digest()
out = {}
gc.collect()
before = gc.mem_alloc()
ec.precompute()
gc.collect()
out["table_heap"] = gc.mem_alloc() - before
out["precompute"] = measure(ec.precompute_steps, fresh_table)
out["pair"] = measure(lambda: p256.pair_steps(priv, bytes(48)))
out["whole_sign"] = measure(lambda: p256.sign_steps(priv, digest, bytes(48)))
pub = p256.public_key(priv)
cmd = bytes.fromhex(__CMD__)
out["verify_command"] = measure(lambda: cose.open_command_steps(cmd, __OP__, __DEV__))
out["public_key"] = measure(lambda: p256.public_key_steps(priv))

gc.collect()
before = gc.mem_alloc()
pool = [p256.finish(p256.pair_steps(priv, bytes(48))) for _ in range(4)]
gc.collect()
out["pool_of_4_heap"] = gc.mem_alloc() - before
r, k_inv = pool[0]
out["sign_with_pair_us"] = timed(lambda: p256.sign_with_pair(priv, digest, r, k_inv))


EVENT = [('noise/impulse', 'dBA', 118.2), ('noise/rise', 'dB', 31.5)]
body = payload.encode_payload('cn-240ac4e29526', 7, 1, 123456, 1, EVENT, 1763900000)
out["event_body_us"] = timed(lambda: payload.encode_payload('cn-240ac4e29526', 7, 1, 123456, 1,
                                                            EVENT, 1763900000))
out["event_sign_envelope_us"] = timed(lambda: cose.sign1_envelope(
    body, 'cn-240ac4e29526', p256.sign_with_pair(priv, sha256(cose.sign1_tbs(body)).digest(),
                                                 r, k_inv)))
WINDOW = [('light/lux', 'lx', 412.5), ('env/temperature', 'Cel', 21.3),
          ('env/humidity', '%RH', 55.2), ('env/pressure', 'Pa', 101325.0),
          ('air/pm2_5', 'ug/m3', 12.5), ('air/pm10', 'ug/m3', 20.1),
          ('air/pm1_0', 'ug/m3', 8.0), ('noise/laeq', 'dBA', 61.3), ('noise/lamax', 'dBA', 75.1),
          ('noise/lamin', 'dBA', 45.0), ('noise/l10', 'dBA', 65.0), ('noise/l90', 'dBA', 50.0),
          ('noise/overruns', 'count', 0), ('node/loop_ms', 'ms', 12), ('node/rssi', 'dBm', -61),
          ('node/reset_cause', None, 1), ('node/boot', 'count', 3), ('node/spool', 'count', 0),
          ('node/dropped', 'count', 0), ('node/heap_free', 'B', 40000),
          ('node/firmware', None, '0.3.0')]
out["window_payload"] = measure(lambda: payload.encode_steps('cn-240ac4e29526', 7, 1, 123456, 0,
                                                             WINDOW, 1763900000))
print(json.dumps(out))
"""


def run(reps: int = 7) -> dict:
    from tests.test_firmware_crypto import CMD, NODE

    code = SCRIPT.replace("__REPS__", str(reps)).replace("__CMD__", repr(CMD["sign1"])).replace(
        "__OP__", repr(bytes.fromhex(CMD["operator_public_key"]))).replace(
        "__DEV__", repr(NODE["device"]))
    return run_micropython_json(code, heap_kb=1024, timeout=600)  # room for the timings


def chip(host_us: float, factor: int) -> str:
    return f"{host_us * factor / 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the raw measurements")
    args = parser.parse_args()
    got = run(args.reps)
    if args.json:
        print(json.dumps(got, indent=1))
        return
    print(f"{'operation':16} {'steps':>5} {'max step':>9} {'chip x100':>10} {'chip x150':>10} "
          f"{'total':>9} {'chip x100':>10} {'peak heap (chip)':>17}")
    for name in ("precompute", "pair", "whole_sign", "verify_command", "public_key",
                 "window_payload"):
        m = got[name]
        print(f"{name:16} {m['steps']:5} {m['max_step_us']:7} us {chip(m['max_step_us'], 100):>10} "
              f"{chip(m['max_step_us'], 150):>10} {m['total_ms']:6.1f} ms "
              f"{chip(m['total_ms'] * 1000, 100):>10} {m['peak_heap'] // 2:>12} B")
    us = got["sign_with_pair_us"]
    env = got["event_body_us"] + got["event_sign_envelope_us"]
    print(f"sign with a pair: {us} us host, {chip(us, 100)} (x100) .. {chip(us, 150)} (x150)")
    print(f"event envelope with a pair (CBOR, SHA-256, s, COSE): {env} us host, "
          f"{chip(env, 150)} chip (x150), in two pieces: payload {got['event_body_us']} us "
          f"({chip(got['event_body_us'], 150)}), signature and COSE "
          f"{got['event_sign_envelope_us']} us ({chip(got['event_sign_envelope_us'], 150)})")
    print(f"table: {got['table_heap']} B on the unix port (bytearrays: about the same on "
          f"the chip); pool of 4 pairs: {got['pool_of_4_heap']} B ({got['pool_of_4_heap'] // 2} B "
          "chip terms)")


if __name__ == "__main__":
    main()

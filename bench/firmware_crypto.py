"""Micro-benchmark of the node's crypto on the MicroPython unix port (110 KB heap).

    .venv/bin/python -m bench.firmware_crypto [--out bench/results]

Prints JSON: es256_sign_ms (median of 20 COSE-sized signatures), hmac_sign_ms
(a whole COSE_Mac0), envelope_sign1_ms (payload + COSE_Sign1), table_bytes, the
table's build time and heap, and the heap the crypto modules take. The unix port
on a PC is far faster than an ESP32 at 240 MHz: read the numbers relatively.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.output import save
from citynode.testing.micropython import DEVKITC_HEAP_KB, run_micropython_json

SCRIPT = """
import gc, json, time
gc.collect()
free0 = gc.mem_free()
from node import cose, p256, payload
gc.collect()
free1 = gc.mem_free()
t = time.ticks_us()
table = p256.precompute()
build_ms = time.ticks_diff(time.ticks_us(), t) / 1000
gc.collect()
free2 = gc.mem_free()

def median(fn, n=20):
    runs = []
    for i in range(n):
        t = time.ticks_us()
        fn(i)
        runs.append(time.ticks_diff(time.ticks_us(), t))
    runs.sort()
    return (runs[n // 2 - 1] + runs[n // 2]) / 2000

priv = p256.new_private_key()
pub = p256.public_key(priv)
secret = b'k' * 32
records = [('light/lux', 'lx', 412.5), ('noise/laeq', 'dBA', 61.3), ('air/pm2_5', 'ug/m3', 12.5)]
raw = payload.encode_payload('cn-240ac4e29526', 1, 1, 60000, 0, records, 1763900000)
tbs = b'\\x84jSignature1C\\xa1\\x01&@' + raw
sig = p256.sign(priv, tbs)
gc.collect()
free3 = gc.mem_free()
out = {
    "es256_sign_ms": median(lambda i: p256.sign(priv, tbs + bytes([i]))),
    "hmac_sign_ms": median(lambda i: cose.mac0(raw, 'cn-240ac4e29526', secret)),
    "envelope_sign1_ms": median(lambda i: cose.sign1(
        payload.encode_payload('cn-240ac4e29526', i, 1, 60000, 0, records, 1763900000),
        'cn-240ac4e29526', priv)),
    "es256_verify_ms": median(lambda i: p256.verify(pub, tbs, sig), 5),
    "table_bytes": table,
    "table_build_ms": build_ms,
    "table_heap_bytes": free1 - free2,
    "modules_heap_bytes": free0 - free1,
    "heap_free_after_bytes": free3,
    "heap_total_kb": HEAP,
}
print(json.dumps(out))
"""


def run(heap_kb: int = DEVKITC_HEAP_KB) -> dict:
    return run_micropython_json(SCRIPT.replace("HEAP", str(heap_kb)), heap_kb=heap_kb,
                                timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write <out>/firmware_crypto.json")
    args = parser.parse_args()
    result = run()
    save(result, args.out, "firmware_crypto")


if __name__ == "__main__":
    main()

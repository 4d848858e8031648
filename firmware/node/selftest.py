"""Self-test over serial: the provisioning CLI and the HIL suite call this through
the raw REPL. It samples every configured sensor once and prints one JSON line:
the device id, firmware version, public key, each sensor's readings or error,
and a signed self-test envelope (hex) that the host verifies against the registry.

    import node.selftest; node.selftest.main()     # main(warmup_s=40): wait for the PMS5003
"""

import asyncio
import json
import sys
import time

from node import config, keys, payload, seqno, sensors, version


async def _sample(sensor, warmup_s):
    """A part with nothing to report yet (the PMS5003's fan spinning up) is asked again
    for up to warmup_s; the default 0 keeps a provisioning run fast."""
    deadline = time.ticks_add(time.ticks_ms(), int(warmup_s * 1000))
    readings = await sensor.sample()
    while not readings and time.ticks_diff(deadline, time.ticks_ms()) > 0:
        await asyncio.sleep_ms(500)
        readings = await sensor.sample()
    return readings


def run(cfg=None, node_keys=None, seq=None, warmup_s=0):
    cfg = cfg or config.load()
    node_keys = node_keys or keys.NodeKeys()
    seq = seq or seqno.Sequence()
    report = {}
    records = []
    for sensor in sensors.build(cfg):
        try:
            readings = asyncio.run(_sample(sensor, warmup_s))
            status = "ok" if readings else "warming up"
            report[sensor.name] = {"status": status, "readings": {n: v for n, u, v in readings}}
            records.extend(readings)
        except Exception as exc:  # a failing part is the finding, not a crash
            report[sensor.name] = {"status": "error", "error": str(exc)}
            records.append((sensor.name + "/status", None, "error: " + str(exc)))
        finally:
            sensor.close()
    # always ES256: the provisioning CLI checks it against the registry's public key
    envelope = payload.seal(cfg["device"], seq, node_keys, payload.KIND_SELFTEST, records)
    return {
        "device": cfg["device"],
        "firmware": version.VERSION,
        "micropython": "%d.%d.%d" % sys.implementation.version[:3],
        "public_key": node_keys.public_key_hex(),
        "sensors": report,
        "envelope": envelope.hex(),
    }


def main(warmup_s=0):
    print(json.dumps(run(warmup_s=warmup_s)))

"""Self-test over serial: the provisioning CLI and the HIL suite call this through
the raw REPL. It samples every configured sensor once and prints one JSON line:
the device id, firmware version, public key, each sensor's readings or error,
and a signed self-test envelope (hex) that the host verifies against the registry.

    import node.selftest; node.selftest.main()
"""

import asyncio
import json
import sys
import time

from node import config, keys, payload, seqno, sensors, version


def run(cfg=None, node_keys=None, seq=None):
    cfg = cfg or config.load()
    node_keys = node_keys or keys.NodeKeys()
    seq = seq or seqno.Sequence()
    report = {}
    records = []
    for sensor in sensors.build(cfg):
        try:
            readings = asyncio.run(sensor.sample())
            report[sensor.name] = {"status": "ok", "readings": {n: v for n, u, v in readings}}
            records.extend(readings)
        except Exception as exc:  # a failing part is the finding, not a crash
            report[sensor.name] = {"status": "error", "error": str(exc)}
            records.append((sensor.name + "/status", None, "error: " + str(exc)))
        finally:
            sensor.close()
    body = payload.encode_payload(cfg["device"], seq.next(), seq.boot, time.ticks_ms() & 0x3FFFFFFF,
                                  payload.KIND_SELFTEST, records)
    from node import cose
    envelope = cose.sign1(body, cfg["device"], node_keys)
    return {
        "device": cfg["device"],
        "firmware": version.VERSION,
        "micropython": "%d.%d.%d" % sys.implementation.version[:3],
        "public_key": node_keys.public_key_hex(),
        "sensors": report,
        "envelope": envelope.hex(),
    }


def main():
    print(json.dumps(run()))

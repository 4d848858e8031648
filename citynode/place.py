"""Where a node stands, for the city: one retained SenML pack per device upstream.

The gateway keeps `<prefix>/<gateway>/meta/<device>` (retained, QoS 1) on the city's
broker as the registry says: published when it connects and whenever a reload changes
a device's record, cleared (an empty retained message) when the device is revoked or
leaves the registry. A city client subscribed to `<prefix>/+/meta/+` so knows every
node's place without the registry. The pack is SenML JSON (RFC 8428,
application/senml+json), base name the device id: `lat` and `lon` in degrees (SenML's
units `lat` and `lon`), `height` in m when the registry has it, and `site`, `pole` and
`board` as strings. docs/wire-format.md, "Place".
"""

from __future__ import annotations

import json

from citynode.registry import DeviceRecord, Registry


def place_pack(record: DeviceRecord) -> bytes:
    pack: list[dict] = [{"bn": f"{record.device_id}/", "n": "lat", "u": "lat", "v": record.lat},
                        {"n": "lon", "u": "lon", "v": record.lon}]
    if record.height_m is not None:
        pack.append({"n": "height", "u": "m", "v": record.height_m})
    pack += [{"n": "site", "vs": record.site}, {"n": "pole", "vs": record.pole},
             {"n": "board", "vs": record.board}]
    return json.dumps(pack, separators=(",", ":")).encode()


def places(registry: Registry) -> dict[str, bytes]:
    """device id -> its pack, for every active device."""
    return {device: place_pack(record) for device, record in registry.records.items()
            if record.active}

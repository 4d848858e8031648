# ARGS: {"step": "read" | "next" | "commit"}. The node's ES256 public key: "read" makes
# the key the first time; "next" makes (or names again) the next key of a rollover
# while the node keeps its current one; "commit" makes the next key the node key. The
# radio is switched on first: the ESP32's RNG is only truly random while the radio
# runs, and node/keys.py refuses to make a key without it.
import json
try:
    import network
    network.WLAN(network.STA_IF).active(True)
except Exception:
    pass
from node.keys import NodeKeys
k = NodeKeys()
had = k.has_key()
step = ARGS['step']
if step == 'next':
    public = k.next_key()
elif step == 'commit':
    k.commit_next()
    public = k.public_key()
else:
    public = k.create()
print(json.dumps({'had': had, 'public': public.hex()}))

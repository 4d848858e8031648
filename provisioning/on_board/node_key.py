# ARGS: {"rotate": bool}. The node's ES256 public key, made on the node the first time
# (or anew with rotate). The radio is switched on first: the ESP32's RNG is only
# truly random while the radio runs, and node/keys.py refuses to make a key without it.
import json
try:
    import network
    network.WLAN(network.STA_IF).active(True)
except Exception:
    pass
from node.keys import NodeKeys
k = NodeKeys()
had = k.has_key()
public = k.rotate() if ARGS['rotate'] else k.create()
print(json.dumps({'had': had, 'public': public.hex()}))

# ARGS: {"paths": [...], "claims": {...}}; after file_hash.py. The node hashes what was
# deployed, adds its MAC and key fingerprint to the host's claims and signs the whole.
import machine
from node import cose
from node.keys import NodeKeys
h = hashlib.sha256()
for p in sorted(ARGS['paths']):
    h.update(('%s %s\n' % (p, _h(p))).encode())
r = ARGS['claims']
r['mac'] = binascii.hexlify(machine.unique_id()).decode()
r['files_sha256'] = binascii.hexlify(h.digest()).decode()
k = NodeKeys()
r['key_fingerprint'] = binascii.hexlify(hashlib.sha256(k.public_key()).digest()).decode()
env = cose.sign1(json.dumps(r).encode(), r['device'], k)
print(json.dumps({'envelope': binascii.hexlify(env).decode()}))

# ARGS: {"public": hex}. Installs the operator's public key unless the node has it.
import json, binascii
from node.keys import NodeKeys
k = NodeKeys()
o = k.operator_key()
same = o is not None and binascii.hexlify(o).decode() == ARGS['public']
if not same:
    k.install_operator_key(bytes.fromhex(ARGS['public']))
print(json.dumps({'same': same}))

# ARGS: {"secret": hex}. The low-power option's shared secret; it crosses only the cable.
from node.keys import NodeKeys
NodeKeys().set_hmac_secret(bytes.fromhex(ARGS['secret']))
print('{}')

"""citynode-ops: the operator's machine. Holds the operator key; signs commands that the
gateways relay to the nodes, and shows what each node confirmed."""

"""What tests, the HIL suite, the demo and the benchmarks share to drive the real parts:
emulated boards (emulator), MicroPython runs (micropython), node keys (keys), a gateway
process with its brokers (gateway), provisioning runs (provisioning).

Everything here starts real programs; nothing stands in for one.
"""

"""Real Mosquitto brokers for tests: the launcher lives in the package (citynode/mosquitto.py,
the demo uses it too); this module keeps the names the tests and benchmarks import."""

from citynode.mosquitto import MOSQUITTO, Mosquitto, free_port, free_port_range

__all__ = ["MOSQUITTO", "Mosquitto", "free_port", "free_port_range"]

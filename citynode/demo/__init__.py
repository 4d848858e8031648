"""`make demo`: the whole citynode system on one machine, with embedded defaults.

Two Mosquitto brokers (the pole's and the city's), emulated ESP32 boards from blank
flash, provisioned through the real `citynode-provision`, the real gateway, and the
demo itself acting as the city: it verifies every envelope that reaches the city
broker against the fleet registry and shows what the nodes measure. Midway the
uplink is cut and restored, and one forged envelope is injected.

    python -m citynode.demo [--duration S] [--headless] [--nodes N] [--workdir DIR]

Modules: procs (the processes it starts, each in its own process group), ledger
(what was produced on the pole and what arrived verified at the city), view (the
live terminal view or log lines), cli (options, phases, the summary and exit code).
"""

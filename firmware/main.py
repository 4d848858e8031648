# citynode node firmware: MicroPython runs this after boot.py. It chooses the app's
# slot (node/ota.py) and starts it. No update replaces this file: like the ESP-IDF
# bootloader it must always be able to go back to the app that ran before.
import gc
import sys

STATE = "/data/ota.json"    # node/ota.py writes it
# While the app's modules load, a collection every this many bytes allocated: their
# garbage is reused as they load, and what they keep stays packed at the heap's bottom.
# Collected only when the heap was full, the garbage left the kept objects strewn over
# it: 106 KB free at chip speed in holes of 6 KB at most, and the microphone's 4 KB
# buffers found no room (a crash at every boot once one more module was added).
IMPORT_GC_BYTES = 4096
# machine.reset_cause() on the ESP32 port: how a trial boot that never committed ended
ENDED = {1: "a power cut", 2: "a crash or reset", 3: "the watchdog", 4: "deep sleep",
         5: "a soft reset"}


def _load(path):
    import json
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _save(state, path):
    import json
    import os
    with open(path + ".tmp", "w") as f:
        json.dump(state, f)
    os.rename(path + ".tmp", path)


def _ended():
    import machine
    cause = getattr(machine, "reset_cause", None)     # the unix port (tests) has none
    cause = cause() if cause else 0
    return ENDED.get(cause, "reset cause %d" % cause)


def app_slot(path=STATE):
    """The folder of the app to run, None for the one provisioned. An update runs on
    trial for one boot: if that boot ends before the app commits it (a crash, the
    watchdog, a power cut), this boot goes back to the slot before and says why."""
    state = _load(path)
    if state is None:
        return None
    if state.get("state") == "trial":
        if state.get("boots", 0) >= 1:
            state["state"] = "reverted"
            state["failed"] = state.get("version")
            state["slot"] = state.get("prev")
            state["why"] = state.get("why") or "its trial boot ended in " + _ended()
        else:
            state["boots"] = 1
        _save(state, path)
    return state.get("slot")


def _cannot_start(exc, path=STATE):
    """An update's app that cannot even start: noted, and the next boot runs the one
    before."""
    sys.print_exception(exc)
    state = _load(path)
    if state is not None and state.get("state") == "trial":
        state["why"] = "its app cannot start: %s: %s" % (type(exc).__name__, exc)
        _save(state, path)
    import machine
    machine.reset()


if __name__ == "__main__":
    slot = app_slot()
    if slot:
        sys.path.insert(0, slot)
    try:
        gc.threshold(IMPORT_GC_BYTES)
        import node.app

        gc.threshold(-1)    # MicroPython's default: collect when the heap is full

        node.app.main()
    except Exception as exc:
        if not slot:
            raise
        _cannot_start(exc)

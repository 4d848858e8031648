# citynode node firmware: MicroPython runs this after boot.py. It chooses the app's
# slot (node/ota.py) and starts it. No update replaces this file: like the ESP-IDF
# bootloader it must always be able to go back to the app that ran before.
import sys

STATE = "/data/ota.json"    # node/ota.py writes it


def app_slot(path=STATE):
    """The folder of the app to run, None for the one provisioned. An update runs on
    trial for one boot: if that boot ends before the app commits it (a crash, the
    watchdog, a power cut), this boot goes back to the slot before."""
    import json
    import os
    try:
        with open(path) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return None
    if state.get("state") == "trial":
        if state.get("boots", 0) >= 1:
            state["state"] = "reverted"
            state["failed"] = state.get("version")
            state["slot"] = state.get("prev")
        else:
            state["boots"] = 1
        with open(path + ".tmp", "w") as f:
            json.dump(state, f)
        os.rename(path + ".tmp", path)
    return state.get("slot")


if __name__ == "__main__":
    slot = app_slot()
    if slot:
        sys.path.insert(0, slot)
    try:
        import node.app

        node.app.main()
    except Exception as exc:
        if not slot:
            raise
        # an update's app that cannot even start: the next boot runs the one before
        sys.print_exception(exc)
        import machine

        machine.reset()

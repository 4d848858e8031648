"""Crash-loop protection by reset cause, with a way out that needs no technician.

A crash is counted once in /data/bootcrash: the app's own uncaught exception when it
happens (record_crash), a watchdog bite or a panic at the next boot, by reset_cause()
(WDT_RESET, HARD_RESET) with no plan left behind. Every reset the firmware makes on
purpose leaves a plan first (reset(why)), because on the ESP32 machine.reset() and a
panic both read HARD_RESET; a power-on or a technician's Ctrl-D is no crash either.
Running healthy for HEALTHY_S clears the count.

With MAX_CRASHES counted, main.py starts safe mode instead of the app: the shell and
the key stay; the watchdog stays armed and fed; one signed status says why; and after
a backoff (RETRY_S doubling per further crash, at most MAX_RETRY_S) the node resets
itself to try the app again.
"""

import os
import sys

import machine

from node import fsutil

COUNTER = "/data/bootcrash"
LAST_CRASH = "/data/lastcrash.txt"
PLANNED = "/data/resetwhy"
MAX_CRASHES = 3
HEALTHY_S = 120
RETRY_S = 60
MAX_RETRY_S = 3600
WDT_MS = 60000      # safe mode's own dog: a hang there resets the node too
FEED_MS = 10000


def _read(path):
    try:
        return fsutil.read(path)
    except OSError:
        return None


def _write(path, data):
    """Best effort: a full or broken filesystem must not stop a boot or a reset."""
    try:
        fsutil.makedirs("/data")
        fsutil.write_atomic(path, data)
    except OSError as exc:
        print("citynode: cannot write %s: %s" % (path, exc))


def crashes():
    try:
        return int(_read(COUNTER) or b"0")
    except ValueError:
        return 0


def note_boot():
    """Count the reset that started this boot if it was a crash; True for safe mode. The
    boot after safe mode's own retry runs the app once more, whatever the count: a crash
    then counts one more and doubles the next wait."""
    count = crashes()
    planned = _read(PLANNED)
    if planned is not None:
        try:
            os.remove(PLANNED)
        except OSError:
            pass
        if planned == b"retry":
            return False
    elif machine.reset_cause() in (machine.WDT_RESET, machine.HARD_RESET):
        count += 1
        _write(COUNTER, str(count).encode())
    return count >= MAX_CRASHES


def mark_healthy():
    _write(COUNTER, b"0")


def plan(why):
    """The next reset is on purpose (a command, a technician, a retry): not a crash."""
    _write(PLANNED, why.encode())


def reset(why):
    plan(why)
    machine.reset()


def record_crash(exc):
    """Count the app's crash and keep its traceback for the next boot to report."""
    _write(COUNTER, str(crashes() + 1).encode())
    try:
        fsutil.makedirs("/data")
        with open(LAST_CRASH, "w") as f:
            sys.print_exception(exc, f)
    except OSError:
        pass
    plan("crash")   # counted here, not again at the next boot


def take_last_crash():
    """The traceback of the last crash, once: it is gone after this."""
    text = (_read(LAST_CRASH) or b"").decode()
    if text:
        try:
            os.remove(LAST_CRASH)
        except OSError:
            pass
    return text


def retry_after_s(count, first_s=RETRY_S):
    return min(first_s << max(0, count - MAX_CRASHES), MAX_RETRY_S)


def start(cfg):
    """Safe mode: the app stays stopped, the REPL free; the dog is fed from a timer, which
    also resets the node to try again once the backoff is over."""
    import time
    count = crashes()
    wait_s = retry_after_s(count, cfg.get("safe_mode_retry_s", RETRY_S))
    crash = (_read(LAST_CRASH) or b"").decode()
    print("citynode: SAFE MODE after %d crash resets; the app is stopped, the shell and the "
          "key are kept; it tries again in %d s. Last crash:\n%s" % (count, wait_s, crash))
    wdt = machine.WDT(timeout=WDT_MS)
    deadline = time.ticks_add(time.ticks_ms(), wait_s * 1000)

    def tick(_timer):
        wdt.feed()
        if time.ticks_diff(time.ticks_ms(), deadline) >= 0:
            reset("retry")

    machine.Timer(0).init(period=min(FEED_MS, wait_s * 1000), callback=tick)
    try:
        _report(cfg, count, wait_s, crash)
    except Exception as exc:  # no network, no broker: the console line above says it all
        print("citynode: safe mode status not sent:", exc)


def _report(cfg, count, wait_s, crash):
    """One signed status through the pole's broker: why the node is in safe mode."""
    import asyncio
    from node import config, keys, mqtt, payload, seqno, wifi

    async def send():
        link = wifi.WiFi(cfg["wifi"]["ssid"], cfg["wifi"].get("password"))
        if not await link.connect():
            raise OSError("Wi-Fi %r not reached" % cfg["wifi"]["ssid"])
        broker = cfg["broker"]
        user, password = config.broker_login(cfg)
        client = mqtt.Client(cfg["device"], broker["host"], broker.get("port", 1883),
                             user=user, password=password)
        await client.connect()
        records = [("node/safe_mode", "count", count), ("node/retry_s", "s", wait_s),
                   ("node/last_crash", None, crash[-200:])]
        envelope = payload.seal(cfg["device"], seqno.Sequence(), keys.NodeKeys(),
                                payload.KIND_STATUS, records, alg=cfg.get("alg", "ES256"))
        await client.publish("citynode/up/" + cfg["device"], envelope, qos=1)
        await client.disconnect()

    asyncio.run(send())

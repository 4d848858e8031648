"""Wi-Fi station: connect with a timeout, report status and RSSI, reconnect with backoff.

Nothing here blocks the event loop: the radio associates in the background and
we poll its status every 100 ms with asyncio.sleep_ms. When the link drops,
run() reconnects with exponential backoff and jitter (node.backoff), and stops
waiting early if the driver gets the link back by itself (the ESP32 retries).
"""

import asyncio
import time

import network

from node.backoff import Backoff

IDLE = getattr(network, "STAT_IDLE", 1000)
CONNECTING = getattr(network, "STAT_CONNECTING", 1001)
GOT_IP = getattr(network, "STAT_GOT_IP", 1010)
WRONG_PASSWORD = getattr(network, "STAT_WRONG_PASSWORD", 202)
NO_AP_FOUND = getattr(network, "STAT_NO_AP_FOUND", 201)

STATUS_TEXT = {IDLE: "idle", CONNECTING: "connecting", GOT_IP: "connected",
               WRONG_PASSWORD: "wrong password", NO_AP_FOUND: "access point not found",
               200: "beacon timeout (link lost)", 203: "association failed",
               204: "handshake timeout"}


class WiFi:
    """The STA link. Counters: .connects, .drops; .last_status (last failure: code or error)."""

    def __init__(self, ssid, password=None, *, timeout_ms=15000, backoff_min_ms=1000,
                 backoff_max_ms=60000, poll_ms=500, wlan=None):
        self.ssid = ssid
        self.password = password
        self.timeout_ms = timeout_ms
        self.poll_ms = poll_ms
        self.wlan = wlan or network.WLAN(network.STA_IF)
        self.backoff = Backoff(backoff_min_ms, backoff_max_ms)
        self.connects = 0
        self.drops = 0
        self.last_status = None
        self._up = False

    def isconnected(self):
        return self.wlan.isconnected()

    def status(self):
        """(code, text) of the driver's current status."""
        code = self.wlan.status()
        return code, STATUS_TEXT.get(code, "status %d" % code)

    def rssi(self):
        """Signal in dBm, or None while not connected."""
        if not self.wlan.isconnected():
            return None
        try:
            return self.wlan.status("rssi")
        except (OSError, ValueError, TypeError):
            return None

    async def connect(self):
        """One attempt: True once the link has an IP within timeout_ms, else False."""
        w = self.wlan
        w.active(True)
        if not w.isconnected():
            if w.status() != CONNECTING:
                try:  # the ESP32 refuses connect() while it is still trying
                    w.disconnect()
                except OSError:
                    pass
                w.connect(self.ssid, self.password)
            start = time.ticks_ms()
            while not w.isconnected():
                code = w.status()
                if code == WRONG_PASSWORD or time.ticks_diff(time.ticks_ms(), start) > \
                        self.timeout_ms:
                    self.last_status = code
                    return False
                await asyncio.sleep_ms(100)
        if not self._up:
            self._up = True
            self.connects += 1
        return True

    async def wait_connected(self, timeout_ms=None):
        """Wait (polling, never blocking) until the link is up; False on timeout."""
        start = time.ticks_ms()
        while not self.wlan.isconnected():
            if timeout_ms is not None and time.ticks_diff(time.ticks_ms(), start) > timeout_ms:
                return False
            await asyncio.sleep_ms(100)
        return True

    async def run(self):
        """Keep the link up forever (run it as a task)."""
        while True:
            if self.wlan.isconnected():
                if not self._up:  # up already (earlier boot stage, or the driver's retry)
                    self._up = True
                    self.connects += 1
                self.backoff.reset()
                await asyncio.sleep_ms(self.poll_ms)
                continue
            if self._up:
                self._up = False
                self.drops += 1
            try:
                if await self.connect():
                    continue
            except OSError as e:  # e.g. the ESP32's "Wifi Internal Error": retry later
                self.last_status = e
            await self.wait_connected(self.backoff.next_ms())

    def start(self):
        """run() as an asyncio task; returns the task."""
        return asyncio.create_task(self.run())

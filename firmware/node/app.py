"""The node: sample -> aggregate -> encode -> sign -> send, as asyncio tasks.

Each sensor samples on its own cadence into the current window; the microphone
is read continuously into the sound meter; when the window clock (window_loop,
the node's only one) closes a window, its statistics, the sound metrics and the
node's health become one signed envelope for the uplink (which spools while the
network is away). Impulse events (kind event) and command results and crash
reports (kind status) are signed and sent at once. All P-256 work goes through
node.signer in bounded steps: an impulse event is signed at once with a pooled nonce
pair. The watchdog is fed only while every task makes progress.
"""

import asyncio
import gc
import sys
import time

import machine

from node import aggregate, commands, config, fsutil, keys, lighting, payload, safemode, seqno
from node import sensors, signer, supervisor, uplink, version, wifi
from node.clock import CLOCK
from node.doorbell import Doorbell
from node.spool import EVENT, ROUTINE

SENSOR_GRACE_MS = 10000
SEAL_TRIES = 3          # an envelope the heap has no room for is tried this often, then lost
SEAL_RETRY_MS = 100     # between tries: the other tasks may free some
OTA_STATE = "/data/ota.json"   # node/ota.py's STATE: none until the node's first update
TRIAL_MS = 600000      # an update on trial that has not reached the city by then is left
HUMID_RH = 80  # above this a PMS5003 over-reads (droplets count as particles): flagged, not fixed


def _ota():
    """node.ota, imported only when there is an update: a stock image loads its code into
    the heap, where a devkitc has no room to spare (issue 11)."""
    from node import ota
    return ota


class Node:
    def __init__(self, cfg):
        self.cfg = cfg
        self.device = cfg["device"]
        # The dog first: a part that hangs while it is set up must reset the node too.
        self.supervisor = supervisor.Supervisor(cfg.get("wdt_ms", 30000))
        self.keys = keys.NodeKeys()
        mic = cfg["sensors"].get("mic")    # big contiguous buffers first, before fragments
        self.sound = sensors.Sound(mic, cfg["impulse_db"], self._impulse) if mic else None
        self.room = payload.Room()  # where windows are sealed: made while the heap is whole
        fsutil.keep_reserve()       # room for the essential writes when the flash fills
        self.seq = seqno.Sequence()
        self.signer = signer.Signer(self.keys, self.seq.boot)  # creates the key on first boot
        self.window = aggregate.Window()
        self.window_started = time.ticks_ms()
        self.sensors = sensors.build(cfg)
        self.lamp = None            # the lamp's PWM, when config.json names its pin
        self.lighting = None
        self.lamp_level = None      # percent, as the PWM is set
        self.lighting_bell = Doorbell()
        if cfg.get("lamp_pin") is not None:
            self.lighting = lighting.Lighting(cfg.get("lighting"))
            cfg["lighting"] = self.lighting.s       # in force: report_config shows them
            self.lamp = machine.PWM(machine.Pin(cfg["lamp_pin"]), freq=1000, duty_u16=0)
            self.lamp_level = self.lighting.level   # as before a reset, before anything else
            self._light(self.lamp_level)
        self.errors = {}
        self.urgent = []            # (kind, records, uptime_ms): sent at once (_send_urgent)
        self.urgent_bell = Doorbell()
        self.healthy_marked = False
        # a boot this long healthy is good: it clears the crash count and keeps an update
        # on trial (config.json healthy_s, as ESPHome's boot_is_good_after)
        self.healthy_ms = int(cfg.get("healthy_s", safemode.HEALTHY_S) * 1000)
        self.failing = set()        # sensors whose last sample failed
        self.read_ok = set()        # sensors that have read at least once this boot
        self.on_trial = _ota().on_trial() if fsutil.exists(OTA_STATE) else False
        self.trial_faults = _ota().trial_faults() if self.on_trial else ()
        self.commands = commands.Commands(self.device, self.keys, {
            "set_interval": self._set_interval,
            "lamp": self._set_lamp,
            "lamp_auto": self._lamp_auto,
            "set_lighting": self._set_lighting,
            "reboot": self._reboot,
            "report_config": lambda args: config.public_view(self.cfg),
            "rotate_key": self._rotate_key,
            "commit_key": self._commit_key,
            "ota_begin": self._ota_begin,
            "ota_chunk": self._ota_chunk,
            "ota_finish": self._ota_finish,
        }, complete=self.signer.complete)
        self.update = None          # an operator's update being received (node/ota.py)
        self.wifi = wifi.WiFi(cfg["wifi"]["ssid"], cfg["wifi"].get("password"))
        broker = cfg["broker"]
        settings = dict(cfg.get("uplink") or {})
        settings["user"], settings["password"] = config.broker_login(cfg)
        self.uplink = uplink.Uplink(self.device, broker["host"], broker.get("port", 1883),
                                    settings, on_downlink=self._downlink, wifi=self.wifi)

    # --- envelopes ------------------------------------------------------------------
    async def envelope(self, kind, records, uptime_ms=None, urgent=False, room=None):
        return await payload.seal_async(self.device, self.seq, self.signer, kind, records,
                                        uptime_ms, self.cfg["alg"], urgent, room)

    def _count_error(self, where, exc):
        self.errors[where] = self.errors.get(where, 0) + 1
        print("citynode: %s: %s" % (where, exc))

    # --- tasks --------------------------------------------------------------------------
    async def sensor_loop(self, sensor):
        name = "sensor:" + sensor.name
        self.supervisor.register(name)
        while True:
            try:
                for quantity, unit, value in await sensor.sample():
                    self.window.add(quantity, unit, value, trimmed=quantity.startswith("air/pm"))
                    if quantity == "light/lux" and self.lighting is not None:
                        self.lighting.lux(value)
                self.window.flags.pop(sensor.name + "/status", None)
                self.failing.discard(sensor.name)
                self.read_ok.add(sensor.name)
            except MemoryError as exc:
                gc.collect()
                self._count_error(name, exc)
            except Exception as exc:  # a failing part is reported, the node goes on
                self.window.flag(sensor.name + "/status", "error: %s" % exc)
                self.failing.add(sensor.name)
                self._count_error(name, exc)
            # quiet until the next reading, plus a grace for a slow part (the PMS5003's fan)
            self.supervisor.beat(name, quiet_ms=int(sensor.interval_s * 1000) + SENSOR_GRACE_MS)
            await sensor.wait_next()

    async def audio_loop(self):
        self.supervisor.register("audio")
        await self.sound.run(lambda: self.supervisor.beat("audio"), self._send_heard)

    def _impulse(self, t_us, level, rise, lzpeak, lapeak, rise_ms, duration_ms, decay, kind,
                 lost_ms):
        records = [("noise/impulse", "dBA", level), ("noise/rise", "dB", rise),
                   ("noise/lzpeak", "dB", lzpeak), ("noise/lapeak", "dB", lapeak),
                   ("noise/risetime", "ms", rise_ms), ("noise/duration", "ms", duration_ms),
                   ("noise/decay", "dB", decay), ("noise/class", None, kind),
                   ("noise/lost_ms", "ms", lost_ms)]
        onset_ms = CLOCK.uptime_us(t_us) // 1000    # the envelope's uptime: its onset
        self.urgent.append((payload.KIND_EVENT, records, onset_ms))
        self.urgent_bell.ring()
        if self.lighting is not None:   # in the audio's turn: no flash write here
            self.lighting.impulse()
            self.lighting_bell.ring()   # the lighting task raises the lamp at once

    def _light(self, level):
        self.lamp.duty_u16(level * 65535 // 100)

    def _follow_rules(self):
        level, _ = self.lighting.decide()
        if level != self.lamp_level:
            self._light(level)
            self.lamp_level = level

    async def lighting_loop(self):
        self.supervisor.register("lighting")
        while True:
            self._follow_rules()
            self.supervisor.beat("lighting")
            await self.lighting_bell.wait(1000)

    async def _status(self, records, t_ms):
        """Command results and crash reports: kind status, sent at once like events (signed
        as routine: an impulse never waits for one)."""
        await self.uplink.send(await self.envelope(payload.KIND_STATUS, records, t_ms), EVENT)

    async def _send_heard(self):
        """The audio task's, in the turn that heard an impulse: woken by the doorbell, the
        event task would run only after every task already waiting for the loop (a median
        65 ms at chip speed). Only what is signed at once (a pool pair): a whole
        signature's steps would keep the audio from its ring for ~0.5 s."""
        await self._send_urgent(at_once=True)

    def _seals_at_once(self):
        return self.cfg["alg"] == "HMAC256" or self.signer.at_once(urgent=True)

    async def _send_urgent(self, at_once=False):
        """Seal and queue what is urgent (`at_once`: only while it is signed without steps)."""
        while self.urgent and (not at_once or self._seals_at_once()):
            kind, records, t_ms = self.urgent.pop(0)
            try:
                envelope = await self._seal(kind, records, t_ms, True)
            except MemoryError as exc:
                self._heap_short("event", exc)
                continue
            # spool priority EVENT: kept longest when the spool is full (few)
            await self.uplink.send(envelope, EVENT)

    async def event_loop(self):
        self.supervisor.register("events")
        while True:
            await self._send_urgent()
            self.supervisor.beat("events")
            await self.urgent_bell.wait(1000)   # rung by an impulse: its 250 ms budget

    async def window_loop(self):
        self.supervisor.register("window")
        while True:
            await asyncio.sleep_ms(200)
            self.supervisor.beat("window")
            if time.ticks_diff(time.ticks_ms(), self.window_started) < self.cfg["window_s"] * 1000:
                continue
            self.window_started = time.ticks_ms()
            try:
                envelope = await self.close_window()
                await self._heap_tries(self.uplink.send, envelope, ROUTINE)   # its copy
            except MemoryError as exc:
                self._heap_short("window", exc)
                continue
            # uptime, as in every envelope: ticks_ms counts from the chip's reset
            if not self.healthy_marked and time.ticks_diff(time.ticks_ms(), 0) > self.healthy_ms:
                safemode.mark_healthy()
                self.healthy_marked = True
            if self.on_trial:
                await self._try_update()

    async def _try_update(self):
        """The update this boot runs on trial, its self-test at each window: left at once
        (a reset: main.py goes back) when a sensor fails that did not before it came;
        kept once every other sensor has read, the node has run healthy and reached the
        city; left if it cannot in TRIAL_MS."""
        broken = [name for name in self.failing if name not in self.trial_faults]
        unread = [s.name for s in self.sensors
                  if s.name not in self.read_ok and s.name not in self.trial_faults]
        if broken:
            self._leave_update("self-test: %s failed" % ", ".join(sorted(broken)))
        elif self.healthy_marked and self.uplink.published and not unread:
            self.on_trial = False
            version = _ota().commit()
            read = ", ".join(sorted(self.read_ok)) or "no sensor"
            await self._status([("ota/committed", None, version),
                                ("ota/selftest", None, "passed: " + read)], None)
        elif time.ticks_diff(time.ticks_ms(), 0) > TRIAL_MS:
            self._leave_update("self-test: %s in %d s" % (
                ", ".join(unread) + " never read" if unread else "the city not reached",
                TRIAL_MS // 1000))

    def _leave_update(self, why):
        _ota().fail(why)
        safemode.reset("update left: " + why)

    async def close_window(self):
        """The signed envelope of the window that ends now (in self.room: queue it before
        the next); a new window starts."""
        rh = self.window.stats.get("env/humidity")
        if rh is not None and rh.mean() > HUMID_RH and "air/pm2_5" in self.window.stats:
            self.window.flag("air/pm_quality", "humid")
        records = self.window.records()
        self.window = aggregate.Window()    # before a yield: a reading from now is the next's
        await asyncio.sleep_ms(0)   # a turn of the loop each: at chip speed the three
        if self.sound is not None:  # pieces held it up to ~70 ms in one
            records += self.sound.records()
        await asyncio.sleep_ms(0)
        records += self._health_records()
        return await self._seal(payload.KIND_READINGS, records, room=self.room)

    async def _seal(self, kind, records, uptime_ms=None, urgent=False, room=None):
        return await self._heap_tries(self.envelope, kind, records, uptime_ms, urgent, room)

    async def _heap_tries(self, job, *args):
        """await job(*args), tried SEAL_TRIES times while the heap has no room for it (full
        or fragmented for a moment at chip speed: the audio's and the signer's turns hold
        memory too); MemoryError after the last."""
        for attempt in range(1, SEAL_TRIES + 1):
            try:
                return await job(*args)
            except MemoryError:
                if attempt == SEAL_TRIES:
                    raise
                gc.collect()
                await asyncio.sleep_ms(SEAL_RETRY_MS)

    def _heap_short(self, where, exc):
        """The heap had no room for an envelope, SEAL_TRIES times. It is lost, counted in
        node/errors/<where>; the node goes on (at chip speed, this reset it)."""
        gc.collect()
        self._count_error(where, exc)

    def _health_records(self):
        gc.collect()
        stats = self.uplink.stats()
        records = [
            ("node/loop_ms", "ms", self.supervisor.loop_ms_max),
            ("node/rssi", "dBm", self.wifi.rssi()),
            ("node/reset_cause", None, machine.reset_cause()),
            ("node/boot", "count", self.seq.boot),
            ("node/spool", "count", stats["depth"]),
            ("node/dropped", "count", stats["dropped"]),
            ("node/heap_free", "B", gc.mem_free()),
            ("node/firmware", None, version.VERSION),
            # signatures from the pool of nonce pairs, and whole in steps (~1 s of the
            # chip's time each): an event signed whole is an event late
            ("node/signed_pooled", "count", self.signer.pairs),
            ("node/signed_whole", "count", self.signer.whole),
        ]
        if self.lighting is not None:   # the lamp, and what set it (docs/operations.md)
            records += [("lamp/level", "%", self.lighting.level),
                        ("lamp/source", None, self.lighting.source)]
        if CLOCK.synced:    # the last sync: how far it moved the clock, its round trip
            records += [("clock/step_ms", "ms", CLOCK.last_step_us // 1000),
                        ("clock/rtt_ms", "ms", CLOCK.last_rtt_us // 1000),
                        ("clock/drift_ppm", "ppm", CLOCK.drift_ppm)]
        if not fsutil.keep_reserve():
            records.append(("node/fs_status", None, "full: free flash space; the spool "
                                                    "keeps readings in RAM meanwhile"))
        for where in self.errors:
            records.append(("node/errors/" + where, "count", self.errors[where]))
        for reason in self.commands.refused:
            records.append(("node/cmd_refused/" + reason, "count", self.commands.refused[reason]))
        self.supervisor.loop_ms_max = 0
        return [r for r in records if r[2] is not None]

    # --- downlink -----------------------------------------------------------------------
    async def _downlink(self, envelope):
        """Every answer, refusal or not, is signed and says what the node now runs with:
        the last command number it accepted (the operator's next must be above it) and
        every setting a command can change, so the operator sees what took effect."""
        try:
            name, result = await self.commands.handle(envelope)
            records = [("cmd/" + name, None, "ok" if result is None else str(result))]
        except commands.CommandRefused as exc:      # the reason, and what to do about it
            records = [("cmd/refused", None, exc.reason), ("cmd/detail", None, str(exc)[:160])]
        if self.commands.highest.value >= 0:
            records.append(("cmd/seq", None, self.commands.highest.value))
        await self._status(records + self.settings(), None)

    def settings(self):
        """The settings commands change, as status records."""
        records = [("set/window_s", "s", self.cfg["window_s"])]
        for sensor in self.sensors:
            records.append(("set/%s/interval_s" % sensor.name, "s", sensor.interval_s))
        if self.lighting is not None:
            records += [("set/lamp", "%", self.lighting.level),
                        ("set/lamp_source", None, self.lighting.source)]
        return records

    def _set_interval(self, args):
        seconds = args["seconds"]
        if not (isinstance(seconds, int) and 5 <= seconds <= 3600):
            raise ValueError("seconds must be 5..3600")
        target = args.get("sensor")
        if target is None:
            self.cfg["window_s"] = seconds
            return None
        for sensor in self.sensors:
            if sensor.name == target:
                sensor.interval_s = seconds
                return None
        raise ValueError("no sensor %s" % target)

    def _set_lamp(self, args):
        """The operator's override: `level` % for `minutes` (default 60), then the rules."""
        level, minutes = args["level"], args.get("minutes", 60)
        if not (isinstance(level, int) and 0 <= level <= 100):
            raise ValueError("level must be 0..100 %")
        if not (isinstance(minutes, int) and 1 <= minutes <= 1440):
            raise ValueError("minutes must be 1..1440")
        if self.lighting is None:
            raise ValueError("no lamp_pin configured")
        self.lighting.override(level, minutes)
        self._follow_rules()
        return None

    def _set_lighting(self, args):
        """Lighting settings changed over the air, kept across resets (node/lighting.py)."""
        if self.lighting is None:
            raise ValueError("no lamp_pin configured")
        kept = self.lighting.configure(args)
        self.cfg["lighting"] = self.lighting.s      # report_config shows them
        self._follow_rules()
        return None if kept else "applied, not kept across a reset: the flash is full"

    def _lamp_auto(self, args):
        """The operator's override ends: the rules decide again."""
        if self.lighting is None:
            raise ValueError("no lamp_pin configured")
        self.lighting.release()
        self._follow_rules()
        return None

    def _reboot(self, args):
        asyncio.create_task(self._reboot_soon("command"))
        return None

    async def _reboot_soon(self, why):
        await asyncio.sleep_ms(2000)  # let the acknowledgement go out
        safemode.reset(why)

    # An update (docs/ota.md): the signed manifest, the bundle's bytes in chunks (each a
    # signed command), then the check of every file and a reset into the trial boot.
    # Each answer says where the download stands, so the operator resumes from there.
    async def _ota_begin(self, args):
        update = _ota().Update(self.keys.operator_key(), self.cfg.get("board"),
                            complete=self.signer.complete)
        await update.begin(args["manifest"])
        self.update = update
        return "offset %d" % update.offset()

    def _ota_chunk(self, args):
        if self.update is None:
            raise ValueError("no update under way: ota_begin first")
        return "offset %d" % self.update.write(args["at"], args["data"])

    async def _ota_finish(self, args):
        if self.update is None:
            raise ValueError("no update under way: ota_begin first")
        version = await self.signer.complete(self.update.finish_steps(self.failing))
        self.update = None
        asyncio.create_task(self._reboot_soon("update " + version))
        return "ready " + version

    async def _rotate_key(self, args):
        """Phase one of a key rollover: the next key's public key, in this answer signed
        with the current key (which the registry trusts). The node switches on commit_key."""
        return "next " + (await self.signer.next_key()).hex()

    async def _commit_key(self, args):
        """Phase two: sign with the next key from now on (this answer already is)."""
        return "switched " + (await self.signer.commit_next()).hex()

    # --- main -----------------------------------------------------------------------------
    async def run(self):
        try:    # the top clock: the stock image boots at 160 MHz; at 240 every turn of
            machine.freq(240000000)     # the loop is 1.5x shorter (a pole has mains power)
        except ValueError:              # an ESP32-C3: 160 MHz is its top
            pass
        crash = safemode.take_last_crash()
        if crash:
            asyncio.create_task(self._status([("node/last_crash", None, crash[-200:])], 0))
        failed = _ota().take_reverted() if fsutil.exists(OTA_STATE) else None
        if failed:      # the update's trial boot ended before its commit: this app is back
            asyncio.create_task(self._status([("ota/reverted", None, failed[0]),
                                              ("ota/why", None, failed[1])], 0))
        ntp = self.cfg["ntp"]
        tasks = [self.signer.run(), self.wifi.run(), self.uplink.run(), self.window_loop(),
                 self.event_loop(), self.supervisor.run(),
                 CLOCK.run(ntp["host"], ntp["port"], self.wifi.isconnected)]
        tasks += [self.sensor_loop(s) for s in self.sensors]
        if self.lighting is not None:
            tasks.append(self.lighting_loop())
        if self.sound is not None:
            tasks.append(self.audio_loop())
        await asyncio.gather(*tasks)


def main():
    try:
        cfg = config.load()
    except config.ConfigError as exc:
        print("citynode: cannot start:", exc)
        return
    if safemode.note_boot():
        safemode.start(cfg)
        return
    if not keys.NodeKeys().has_key():
        print("citynode: cannot start: no node key; provision this node (citynode-provision)")
        return
    print("citynode: node %s, firmware %s, starting" % (cfg["device"], version.VERSION))
    try:
        asyncio.run(Node(cfg).run())
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        safemode.record_crash(exc)
        sys.print_exception(exc)
        machine.reset()

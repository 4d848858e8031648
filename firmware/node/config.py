"""The node's configuration: /config.json (written by citynode-provision) plus its
secrets, the Wi-Fi password in /secret/wifi.json and the pole broker's password in
/secret/broker.json. Validated once at boot; a bad value stops the app with one console
line that says which key is wrong and what to write.
"""

import json

from node import sensors as parts

CONFIG_PATH = "/config.json"
WIFI_SECRET_PATH = "/secret/wifi.json"
BROKER_SECRET_PATH = "/secret/broker.json"

DEFAULTS = {
    "window_s": 60,
    "alg": "ES256",
    "broker": {"host": "192.168.4.1", "port": 1883},
    "lamp_pin": None,
    "impulse_db": 15.0,
    "sensors": {},
}


class ConfigError(ValueError):
    pass


def _need(cond, key, fix):
    if not cond:
        raise ConfigError("config.json: '%s' %s" % (key, fix))


def _number(value, low, high):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def validate(cfg):
    """Fill defaults and check every key; returns the dict or raises ConfigError."""
    _need(isinstance(cfg, dict), "(file)", "must hold a JSON object")
    for key, value in DEFAULTS.items():
        cfg.setdefault(key, value)
    device = cfg.get("device")
    _need(isinstance(device, str) and device.startswith("cn-") and len(device) == 15,
          "device", "must be cn- and the 12 hex digits of the MAC (re-run citynode-provision)")
    _need(_number(cfg["window_s"], 5, 3600), "window_s", "must be seconds between 5 and 3600")
    _need(cfg["alg"] in ("ES256", "HMAC256"), "alg", "must be ES256 or HMAC256")
    _need(_number(cfg.get("safe_mode_retry_s", 60), 1, 3600), "safe_mode_retry_s",
          "must be seconds between 1 and 3600 (safe mode's first wait before a retry)")
    _need(_number(cfg.get("healthy_s", 120), 10, 3600), "healthy_s",
          "must be seconds between 10 and 3600 (a boot this long healthy is good)")
    broker = cfg["broker"]
    _need(isinstance(broker, dict) and isinstance(broker.get("host"), str), "broker.host",
          "must name the gateway's MQTT broker, e.g. 192.168.4.1")
    _need(_number(broker.get("port", 1883), 1, 65535), "broker.port", "must be a TCP port")
    ntp = cfg.setdefault("ntp", {})
    _need(isinstance(ntp, dict), "ntp", "must be an object: the pole's time server")
    ntp.setdefault("host", broker["host"])    # the pole: its chrony serves the nodes
    ntp.setdefault("port", 123)
    _need(isinstance(ntp["host"], str), "ntp.host", "must name the pole's time server")
    _need(_number(ntp["port"], 1, 65535), "ntp.port", "must be a UDP port")
    wifi = cfg.get("wifi")
    _need(isinstance(wifi, dict) and isinstance(wifi.get("ssid"), str) and wifi["ssid"],
          "wifi.ssid", "must name the pole's Wi-Fi network")
    sensors = cfg["sensors"]
    _need(isinstance(sensors, dict), "sensors", "must be an object of sensor settings")
    for name in sensors:
        _need(name in parts.PARTS, "sensors." + name, "is not a sensor we drive")
        spec = sensors[name]
        _need(isinstance(spec, dict), "sensors." + name, "must be an object")
        interval = spec.get("interval_s", parts.INTERVAL_S)
        _need(_number(interval, 0.1, 3600), "sensors.%s.interval_s" % name,
              "must be seconds between 0.1 and 3600")
    mic = sensors.get("mic")
    if mic is not None:
        _need(mic.get("rate", parts.RATE) in parts.RATES, "sensors.mic.rate",
              "must be 16000 or 48000")
        _need(_number(mic.get("calibration_db", 0.0), -20, 20), "sensors.mic.calibration_db",
              "must be a dB offset between -20 and 20")
    check_lighting(cfg.get("lighting", {}))
    return cfg


# lighting settings (node/lighting.py DEFAULTS): (low, high, what) or None for HH:MM
_LIGHTING = {"dusk_lux": (0, 1000, "lux"), "dawn_lux": (0, 5000, "lux"),
             "hold_s": (1, 600, "s"),
             "night_level": (0, 100, "%"), "quiet_level": (0, 100, "%"),
             "event_level": (0, 100, "%"), "event_s": (1, 3600, "s"),
             "utc_offset_min": (-720, 840, "minutes"), "quiet_from": None,
             "quiet_until": None, "on_at": None, "off_at": None}


def check_lighting(settings):
    """Raise ConfigError naming the first lighting setting a street cannot use."""
    from node.lighting import minutes
    _need(isinstance(settings, dict), "lighting", "must be an object of lighting settings")
    for key in settings:
        _need(key in _LIGHTING, "lighting." + key, "is not a lighting setting (%s)"
              % ", ".join(sorted(_LIGHTING)))
        limits = _LIGHTING[key]
        if limits is None:
            try:
                minutes(settings[key])
            except (ValueError, AttributeError, TypeError):
                _need(False, "lighting." + key, "must be a time of day, HH:MM")
        else:
            _need(_number(settings[key], limits[0], limits[1]), "lighting." + key,
                  "must be %s..%s %s" % limits)
    _need(settings.get("dawn_lux", 50) > settings.get("dusk_lux", 20), "lighting.dawn_lux",
          "must be above dusk_lux (and above what the lamp itself adds on the sensor)")


def _secret(path):
    """A secret file's password, or None when the node has none (or it is unreadable)."""
    try:
        with open(path) as f:
            password = json.load(f).get("password")
    except (OSError, ValueError, AttributeError):
        return None
    return password if isinstance(password, str) else None


def load(path=CONFIG_PATH, secret_path=WIFI_SECRET_PATH, broker_path=BROKER_SECRET_PATH):
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError:
        raise ConfigError("config.json: missing; provision this node with citynode-provision")
    except ValueError:
        raise ConfigError("config.json: not valid JSON; re-run citynode-provision deploy")
    cfg = validate(cfg)
    cfg["wifi"]["password"] = _secret(secret_path) or ""
    password = _secret(broker_path)
    if password is not None:  # the pole broker's account: user name = device id
        cfg["broker"]["user"] = cfg["device"]
        cfg["broker"]["password"] = password
    return cfg


def broker_login(cfg):
    """(user, password) for the pole broker; (None, None): an open bench broker."""
    broker = cfg["broker"]
    return broker.get("user"), broker.get("password")


def public_view(cfg):
    """The configuration without secrets, for the report_config command."""
    view = {}
    for key in cfg:
        if key == "wifi":
            view[key] = {"ssid": cfg[key].get("ssid")}
        elif key == "broker":
            view[key] = {k: v for k, v in cfg[key].items() if k != "password"}
        else:
            view[key] = cfg[key]
    return view

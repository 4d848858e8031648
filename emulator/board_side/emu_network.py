# `network` for the emulated ESP32: the host plays the access point, decides
# when the link is up, and carries the board's TCP traffic while it is.
import struct
import emu_link as _link

STA_IF = 0
AP_IF = 1
STAT_IDLE = 1000
STAT_CONNECTING = 1001
STAT_GOT_IP = 1010
STAT_NO_AP_FOUND = 201
STAT_WRONG_PASSWORD = 202
STAT_BEACON_TIMEOUT = 200
STAT_ASSOC_FAIL = 203
STAT_HANDSHAKE_TIMEOUT = 204

_ACTIVE, _CONNECT, _DISCONNECT, _STATUS, _RSSI, _IFCONFIG, _SCAN = 0, 1, 2, 3, 4, 5, 6


# esp_exceptions() in the ESP32 port: an ESP-IDF error becomes an OSError with its text
_ESP_ERRORS = {1: "Wifi Not Started", 16: "Wifi Internal State Error"}


def _call(sub, payload=b""):
    try:
        return _link.call(_link.WLAN, sub, payload)
    except OSError as e:
        text = _ESP_ERRORS.get(e.errno)
        if text is None:
            raise
        raise OSError(text)


def hostname(name=None):
    return "citynode"


class WLAN:
    IF_STA = STA_IF
    IF_AP = AP_IF

    def __init__(self, interface=STA_IF):
        if interface != STA_IF:
            raise ValueError("only the station interface is emulated")

    def active(self, flag=None):
        if flag is None:
            return _link.call(_link.WLAN, _ACTIVE, b"?")[0] == 1
        _link.call(_link.WLAN, _ACTIVE, b"\x01" if flag else b"\x00")

    def connect(self, ssid=None, key=None, bssid=None):
        ssid = (ssid or "").encode()
        key = (key or "").encode()
        _call(_CONNECT, bytes((len(ssid),)) + ssid + key)

    def disconnect(self):
        _call(_DISCONNECT)

    def status(self, param=None):
        if param == "rssi":
            return struct.unpack("<b", _link.call(_link.WLAN, _RSSI))[0]
        return struct.unpack("<H", _link.call(_link.WLAN, _STATUS))[0]

    def isconnected(self):
        return self.status() == STAT_GOT_IP

    def ifconfig(self, config=None):
        return tuple(_link.call(_link.WLAN, _IFCONFIG).decode().split(","))

    def scan(self):
        out = []
        for line in _link.call(_link.WLAN, _SCAN).decode().split("\n"):
            if line:
                ssid, rssi = line.rsplit(",", 1)
                out.append((ssid.encode(), b"\x24\x0a\xc4\x00\x00\x01", 6, int(rssi), 3, False))
        return out

    def config(self, *args, **kw):
        if args == ("mac",):
            import emu_machine
            return emu_machine.unique_id()
        if args == ("rssi",):
            return self.status("rssi")
        if args == ("essid",) or args == ("ssid",):
            return ""
        return None

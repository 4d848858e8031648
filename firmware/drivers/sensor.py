"""Errors the sensor drivers raise, worded for the technician at the pole.

Both are OSError subclasses, so code that already catches OSError around bus
transactions keeps working; the node turns them into a status record and goes on.

    SensorMissing  nothing answers: unplugged, wrong address, broken wire, no power
    SensorFault    something answers, but not sensibly: wrong chip, corrupted data
"""


class SensorError(OSError):
    """Base class: `sensor` names the part ('BH1750', 'BME280', 'PMS5003')."""

    def __init__(self, sensor, message):
        super().__init__(message)
        self.sensor = sensor


class SensorMissing(SensorError):
    pass


class SensorFault(SensorError):
    pass


def bus_name(bus, kind):
    """A short description of an I2C/UART object for messages, e.g. 'I2C(0, scl=22, sda=21)'.

    The ESP32 port's repr carries the id and pins; other objects (an emulated or a
    test bus) fall back to the bus kind.
    """
    try:
        r = repr(bus)
    except Exception:
        r = '<'
    if r.startswith('<') or '(' not in r:
        return kind
    head, _, rest = r.partition('(')
    fields = [f.strip() for f in rest.rstrip(')').split(',')]
    keep = [fields[0]] + [f for f in fields[1:]
                          if f.startswith(('scl=', 'sda=', 'tx=', 'rx='))]
    return head + '(' + ', '.join(keep) + ')'

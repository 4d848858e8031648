"""Window statistics for the slow sensors: constant memory per quantity.

A window keeps count, sum, min and max of each quantity, so a node samples as
often as it likes without growing lists. Particulate readings are trimmed (the
highest and lowest of the window left out of the mean) because a PMS5003 throws
occasional spikes; readings taken while its fan warms up never get here.
"""


class Stat:
    __slots__ = ("n", "total", "lo", "hi")

    def __init__(self):
        self.n = 0
        self.total = 0.0
        self.lo = None
        self.hi = None

    def add(self, value):
        self.n += 1
        self.total += value
        if self.lo is None or value < self.lo:
            self.lo = value
        if self.hi is None or value > self.hi:
            self.hi = value

    def mean(self, trimmed=False):
        if self.n == 0:
            return None
        if trimmed and self.n > 2:
            return (self.total - self.lo - self.hi) / (self.n - 2)
        return self.total / self.n


class Window:
    """Readings of one window, by quantity name ("air/pm2_5", "light/lux", ...)."""

    def __init__(self):
        self.stats = {}
        self.units = {}
        self.trimmed = {}
        self.flags = {}

    def add(self, name, unit, value, trimmed=False):
        stat = self.stats.get(name)
        if stat is None:
            stat = self.stats[name] = Stat()
            self.units[name] = unit
            self.trimmed[name] = trimmed
        stat.add(value)

    def flag(self, name, text):
        """A condition worth saying with the readings (e.g. high humidity for PM)."""
        self.flags[name] = text

    def records(self):
        """SenML tuples: mean, and min/max where there was more than one sample."""
        out = []
        for name in self.stats:
            stat = self.stats[name]
            unit = self.units[name]
            mean = stat.mean(self.trimmed[name])
            out.append((name, unit, _round(mean)))
            if stat.n > 1:
                out.append((name + "/min", unit, _round(stat.lo)))
                out.append((name + "/max", unit, _round(stat.hi)))
        for name in self.flags:
            out.append((name, None, self.flags[name]))
        return out


def _round(value):
    return round(value, 2)

"""What every simulated part offers the board it is wired to.

Peripherals (emulator/peripherals.py) builds the parts a board's `sensors:` name
through the registry in devices/__init__.py and knows them only through this
interface: the faults (power_off / power_on for unplug / plug, corrupt), the
status (state) and the calls of the part's bus:

    i2c   write(data) -> int, read(n) -> bytes: one bus transaction each
    uart  take(until) -> bytes, arrivals(until) -> [t], receive(data, at),
          `listening` (a UART driver is open), `baud` (what it speaks)
    i2s   stream(rate) -> a sample source (emulator/i2s.py, SampleSource)

so a new part needs no change there: a class in devices/, registered in
devices/__init__.py, and its entry in citynode/parts.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from citynode.parts import PARTS

if TYPE_CHECKING:
    from ..scenario import Scenario


class World(Protocol):
    """The physics the parts sense, at a device-clock time (Peripherals computes it:
    the pole's own lamp adds to the daylight)."""

    scenario: Scenario

    def light(self, wall: float) -> float: ...
    def weather(self, wall: float) -> tuple[float, float, float]: ...
    def air(self, wall: float) -> tuple[float, float, float]: ...


class SimulatedPart:
    """Base of the simulated parts: the fault and status hooks, doing what a part with
    nothing special to do does."""

    name: ClassVar[str]                        # its key in citynode.parts.PARTS, boards.yaml
    corruptible: ClassVar[bool] = False        # takes the 'corrupt' fault
    control_pin: ClassVar[str | None] = None   # the boards.yaml pin that drives one of its inputs

    @classmethod
    def attach(cls, world: World, spec: dict[str, Any], seed: int) -> SimulatedPart:
        """The part as a board has it wired (spec: its boards.yaml entry); seed: its own
        noise, so that parts (and boards) do not hiss in unison."""
        raise NotImplementedError

    @property
    def bus(self) -> str:
        return PARTS[self.name].bus

    def power_on(self) -> None:
        """Plugged back in: the part starts from its power-on state."""

    def power_off(self) -> None:
        """Unplugged. The board already sees nothing (NACK, a silent line); a part whose
        output runs on its own clock stops it here."""

    def corrupt(self, count: int = 1, **kw: Any) -> None:
        """The next `count` outputs are damaged; only `corruptible` parts take it."""
        raise ValueError(f"{self.name}: nothing to corrupt")

    def set_pin_level(self, level: int) -> None:
        """The firmware drove the part's control_pin."""

    def state(self) -> dict[str, Any] | None:
        """What the board's status shows of the part; None: nothing beyond whether it is
        plugged in."""
        return None

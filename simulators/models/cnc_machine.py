"""CNC machining centre: part programs cycling in automatic mode.

Each cycle loads a part, runs the program's operations (tool change, then cutting with
the operation's spindle speed and load) and ends with a part counted as good or, now
and then, scrapped. Occasionally an alarm interrupts the channel until it is cleared.
After a batch the machine is set up for the next program. Feed override stretches the
cutting time (0 % holds the feed); spindle override scales the spindle speed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from device_profiles.schema import Profile
from simulators.models import Value
from simulators.models._base import FamilyModel, ou_step

__all__ = ["CncMachineModel"]

_MAX_EVENTS = 100000  # phase changes handled in one step at most


@dataclass(frozen=True, slots=True)
class _Operation:
    tool: int
    speed: float  # rpm at 100 % override
    load: float  # % spindle load while cutting
    feed: float  # mm/min at 100 % override
    seconds: float  # cutting time at 100 % feed override


@dataclass(frozen=True, slots=True)
class _Program:
    name: str
    operations: tuple[_Operation, ...]


_ALARMS = (
    (1012, "Tool life expired"),
    (2031, "Coolant level low"),
    (3104, "Chip conveyor overload"),
    (4021, "Door interlock open during cycle"),
    (7055, "Spindle load limit exceeded"),
)

# Phases of the machine, in the order a cycle walks through them.
_LOAD, _TOOL_CHANGE, _CUT, _END, _ALARM, _SETUP = range(6)
_LOAD_S, _TOOL_CHANGE_S, _END_S, _SETUP_S = 30.0, 6.0, 5.0, 900.0


class CncMachineModel(FamilyModel):
    """Vertical machining centre with an NC channel and one spindle."""

    def __init__(self, profile: Profile, rng: random.Random) -> None:
        super().__init__(profile, rng)
        self._programs = [self._make_program(name) for name in ("O1001", "O2040", "O3300")]
        self._program = 0
        self._batch_left = rng.randint(20, 50)
        self._phase = _LOAD
        self._left = _LOAD_S
        self._op = 0
        self._cycle_t = 0.0
        self._last_cycle = 0.0
        self._resume = _LOAD
        self._alarm: tuple[int, str] | None = None
        self._good = rng.randint(1000, 200000)
        self._scrap = self._good // rng.randint(80, 200)
        self._power_on = rng.uniform(2000.0, 40000.0)
        self._load_noise = 0.0
        self._serial = f"VMC-{rng.randint(10000, 99999)}"

    def _make_program(self, number: str) -> _Program:
        ops = []
        for _ in range(self.rng.randint(3, 5)):
            ops.append(
                _Operation(
                    tool=self.rng.randint(1, 40),
                    speed=self.rng.choice((2500.0, 4000.0, 6000.0, 8000.0, 10000.0)),
                    load=self.rng.uniform(25.0, 85.0),
                    feed=self.rng.uniform(300.0, 4000.0),
                    seconds=self.rng.uniform(15.0, 60.0),
                )
            )
        part = self.rng.choice(("FLANGE", "HOUSING", "BRACKET", "SHAFT", "COVER"))
        return _Program(f"{number}_{part}", tuple(ops))

    def _next_phase(self) -> None:
        """Leave the current phase (its time is used up) for the next one."""
        prog = self._programs[self._program]
        if self._phase == _LOAD:
            self._op, self._cycle_t = 0, 0.0
            self._phase, self._left = _TOOL_CHANGE, _TOOL_CHANGE_S
        elif self._phase == _TOOL_CHANGE:
            self._phase, self._left = _CUT, prog.operations[self._op].seconds
        elif self._phase == _CUT:
            if self.rng.random() < 0.01:
                self._alarm = self.rng.choice(_ALARMS)
                self._resume = _CUT if self.rng.random() < 0.5 else _TOOL_CHANGE
                self._phase, self._left = _ALARM, self.rng.uniform(60.0, 300.0)
                return
            self._op += 1
            if self._op < len(prog.operations):
                self._phase, self._left = _TOOL_CHANGE, _TOOL_CHANGE_S
            else:
                self._phase, self._left = _END, _END_S
        elif self._phase == _END:
            if self.rng.random() < 0.02:
                self._scrap += 1
            else:
                self._good += 1
            self._last_cycle = self._cycle_t
            self._batch_left -= 1
            if self._batch_left <= 0:
                self._phase, self._left = _SETUP, _SETUP_S
            else:
                self._phase, self._left = _LOAD, _LOAD_S
        elif self._phase == _ALARM:
            self._alarm = None
            self._phase = self._resume
            self._left = (
                _TOOL_CHANGE_S
                if self._resume == _TOOL_CHANGE
                else prog.operations[self._op].seconds * self.rng.uniform(0.1, 0.5)
            )
        elif self._phase == _SETUP:
            self._program = (self._program + 1) % len(self._programs)
            self._batch_left = self.rng.randint(20, 50)
            self._phase, self._left = _LOAD, _LOAD_S

    def _advance(self, dt: float, t: float) -> dict[str, Value]:
        feed_ovr = self._setpoint("feed_override", 100.0)
        spindle_ovr = self._setpoint("spindle_override", 100.0)
        self._power_on += dt / 3600.0
        remaining = dt
        for _ in range(_MAX_EVENTS):
            if remaining <= 0.0:
                break
            # Cutting progresses at the feed override; other phases at wall-clock rate.
            rate = feed_ovr / 100.0 if self._phase == _CUT else 1.0
            if rate <= 0.0:
                if self._phase != _SETUP:
                    self._cycle_t += remaining
                break
            need = self._left / rate
            used = min(remaining, need)
            if self._phase not in (_SETUP,):
                self._cycle_t += used
            self._left -= used * rate
            remaining -= used
            if used >= need:
                self._next_phase()
        prog = self._programs[self._program]
        op = prog.operations[min(self._op, len(prog.operations) - 1)]
        cutting = self._phase == _CUT and feed_ovr > 0.0
        self._load_noise = ou_step(self.rng, self._load_noise, 0.0, 4.0, 5.0, max(dt, 1e-3))
        alarm = self._phase == _ALARM
        if self._phase == _SETUP:
            mode, program_state = 2, 2
        elif alarm:
            mode, program_state = 1, 3
        elif self._phase == _END:
            mode, program_state = 1, 2
        elif self._phase == _LOAD:
            mode, program_state = 1, 0
        else:
            mode, program_state = 1, 1
        code, text = self._alarm if self._alarm is not None else (0, "")
        spindle = op.speed * spindle_ovr / 100.0 if cutting else 0.0
        return {
            "serial_number": self._serial,
            "operation_mode": mode,
            "power_on_duration": self._power_on,
            "stacklight_red": alarm,
            "stacklight_yellow": self._phase in (_LOAD, _SETUP) or feed_ovr == 0.0,
            "stacklight_green": program_state == 1,
            "spindle_rotating": spindle > 0.0,
            "spindle_override": spindle_ovr,
            "spindle_speed": spindle,
            "spindle_load": max(0.0, op.load + self._load_noise) if cutting else 0.0,
            "channel_state": 1 if alarm else (2 if self._phase == _SETUP else 0),
            "channel_mode": 2 if self._phase == _SETUP else 0,
            "feed_override": feed_ovr,
            "feed_rate": op.feed * feed_ovr / 100.0 if cutting else 0.0,
            "program_name": prog.name,
            "program_state": program_state,
            "parts_produced": self._good,
            "parts_scrapped": self._scrap,
            "cycle_time": self._last_cycle,
            "active_tool": op.tool,
            "alarm_count": 1 if alarm else 0,
            "active_alarm_code": code,
            "active_alarm_text": text,
        }

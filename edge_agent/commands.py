"""Writes to a device point on the gateway's request, checked, executed at most once.

``CommandExecutor.execute(device, command)`` answers every WriteCommand with a
WriteResult, whatever arrives: a command past its ``expires`` is refused unwritten; an
unknown device or point, a read-only point, a value of the wrong type or outside the
profile's range is refused before anything is sent; otherwise the point is read, written
and read back through the poller's own driver (so a write never interleaves with a
poll and shares the device's connection and line lock). A request id seen before is
answered from a bounded memory of results and never written again. The executor knows
nothing about MQTT, so a Sparkplug DCMD can use it too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from device_profiles.schema import Point, Profile, ValueType
from edge_agent.config import DeviceConfig
from protocols.driver import Driver, Reading, Value, now_ms
from protocols.errors import ConfigError, ProtocolError
from protocols.mqtt.control import WriteCommand, WriteResult, WriteStatus

__all__ = ["CommandExecutor", "WriteTarget", "check_write", "settled"]

log = logging.getLogger("iiot.agent.cmd")

_DEFAULT_REMEMBER = 1024
_DEFAULT_TIMEOUT = 10.0  # seconds for read, write and read-back together
_INT_TYPES = frozenset(
    {ValueType.INT16, ValueType.UINT16, ValueType.INT32, ValueType.UINT32, ValueType.INT64}
)
# One unit in the last place, relative, of the float types a device may hold a value in.
_ULP = {ValueType.FLOAT32: 2.0**-23, ValueType.FLOAT64: 2.0**-52}


class WriteTarget(Protocol):
    """What a device's poller offers a write: its config, profile and held driver."""

    device: DeviceConfig
    profile: Profile

    def driver(self) -> AbstractAsyncContextManager[Driver]: ...


def check_write(profile: Profile, point_name: str, value: Value) -> tuple[Point | None, str | None]:
    """The point and why writing ``value`` to it is refused (None: it may be written)."""
    try:
        point = profile.point(point_name)
    except KeyError:
        return None, f"point '{point_name}' is not in profile '{profile.id}'"
    if point.access != "rw":
        return point, f"point '{point_name}' is read-only"
    if any(p.scale_factor_point == point_name for p in profile.points):
        # Writing a SunSpec scale factor would silently change what other points mean.
        return point, f"point '{point_name}' is the scale factor of other points"
    if point.type is ValueType.BOOL:
        if not isinstance(value, bool):
            return point, f"point '{point_name}' takes true or false, not {value!r}"
        return point, None
    if point.type is ValueType.STRING:
        if not isinstance(value, str):
            return point, f"point '{point_name}' takes a string, not {value!r}"
        return point, None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return point, f"point '{point_name}' takes a number, not {value!r}"
    if point.type in _INT_TYPES and point.scale == 1.0 and point.offset == 0.0:
        if point.scale_factor_point is None and value != int(value):
            return point, f"point '{point_name}' takes a whole number, not {value!r}"
    if point.range is not None:
        lo, hi = point.range
        if not lo <= value <= hi:
            return point, f"{value!r} is out of range [{lo:g}, {hi:g}] of point '{point_name}'"
    return point, None


def settled(point: Point, wanted: Value, got: Value | None, *, sf: int | None = None) -> bool:
    """Whether the read-back ``got`` shows the written ``wanted``, to the point's resolution.

    ``sf`` is the SunSpec scale-factor exponent the device reported with the read-back.
    An integer register holds ``(value - offset) / scale / 10**sf`` rounded, so it comes
    back within half of ``scale * 10**sf``: with sf=1, 1234 reads back as 1230. A float
    register is off by at most one unit in its last place; text and booleans exactly.
    """
    if got is None:
        return False
    if isinstance(wanted, bool | str) or isinstance(got, bool | str):
        return wanted == got
    want = float(wanted)
    exponent = 10.0**sf if sf else 1.0
    if point.type in _INT_TYPES:
        tolerance = abs(point.scale) * exponent * 0.5
    else:
        tolerance = abs(want - point.offset) * _ULP.get(point.type, 0.0)
    # The decoding's own float arithmetic (and its rounding to 10 decimals) adds a hair.
    tolerance += abs(want) * 1e-12 + 1e-9
    return abs(float(got) - want) <= tolerance


def _with_scale_factor(profile: Profile, point: Point) -> list[Point]:
    """``point``, and its SunSpec scale factor whose value sets the point's resolution."""
    if point.scale_factor_point is None:
        return [point]
    return [point, profile.point(point.scale_factor_point)]


def _exponent(profile: Profile, point: Point, reading: Reading) -> int | None:
    """The scale-factor exponent ``reading`` shows for ``point``; None without one."""
    if point.scale_factor_point is None:
        return None
    sf_point = profile.point(point.scale_factor_point)
    value = reading.values.get(sf_point.name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    raw = (float(value) - sf_point.offset) / sf_point.scale
    return round(raw) if math.isfinite(raw) and -20 <= raw <= 20 else None


def _settle(device: DeviceConfig) -> float:
    """How long a read-back may take to show a write: a subscription reports it late."""
    ua = device.opcua
    if ua is not None and ua.mode == "subscribe":
        return min(5.0, 2 * max(float(ua.sampling_interval), float(ua.publishing)) + 0.5)
    return 0.0


def _shows(profile: Profile, point: Point, wanted: Value, reading: Reading) -> bool:
    sf = _exponent(profile, point, reading)
    return settled(point, wanted, reading.values.get(point.name), sf=sf)


async def _read_back(
    driver: Driver, profile: Profile, point: Point, wanted: Value, settle: float
) -> Reading:
    """Read ``point`` until it shows ``wanted`` or ``settle`` seconds have passed."""
    deadline = time.monotonic() + settle
    while True:
        after = await driver.read(_with_scale_factor(profile, point))
        if _shows(profile, point, wanted, after) or time.monotonic() >= deadline:
            return after
        await asyncio.sleep(0.05)


class CommandExecutor:
    """Checks and executes WriteCommands against the pollers ``lookup`` finds."""

    def __init__(
        self,
        lookup: Callable[[str], WriteTarget | None],
        *,
        remember: int = _DEFAULT_REMEMBER,
        timeout: float = _DEFAULT_TIMEOUT,
    ) -> None:
        self._lookup = lookup
        self._remember = remember
        self._timeout = timeout
        self._done: OrderedDict[str, WriteResult] = OrderedDict()
        self._running: dict[str, asyncio.Future[WriteResult]] = {}
        self.executed = 0  # writes actually sent to a device

    async def execute(self, device: str, cmd: WriteCommand) -> tuple[WriteResult, bool]:
        """The result of ``cmd``, and whether it was answered from memory (a repeated id)."""
        if cmd.id in self._done:
            self._done.move_to_end(cmd.id)
            return self._done[cmd.id], True
        running = self._running.get(cmd.id)
        if running is not None:
            return await asyncio.shield(running), True
        fut: asyncio.Future[WriteResult] = asyncio.get_running_loop().create_future()
        self._running[cmd.id] = fut
        try:
            result = await self._execute(device, cmd)
        except BaseException:
            fut.cancel()
            raise
        finally:
            del self._running[cmd.id]
        fut.set_result(result)
        self._done[cmd.id] = result
        while len(self._done) > self._remember:
            self._done.popitem(last=False)
        return result, False

    async def _execute(self, device: str, cmd: WriteCommand) -> WriteResult:
        def answer(status: WriteStatus, reason: str = "", **values: Value | None) -> WriteResult:
            return WriteResult(id=cmd.id, status=status, reason=reason, ts=now_ms(), **values)

        if now_ms() > cmd.expires:
            return answer(WriteStatus.EXPIRED, f"expired {now_ms() - cmd.expires} ms ago")
        target = self._lookup(device)
        if target is None:
            return answer(WriteStatus.REFUSED, f"device '{device}' is not configured")
        point, refused = check_write(target.profile, cmd.point, cmd.value)
        if point is None or refused is not None:
            return answer(WriteStatus.REFUSED, refused or "")
        previous: Value | None = None
        try:
            async with asyncio.timeout(self._timeout), target.driver() as driver:
                before = await driver.read([point])
                previous = before.values.get(point.name)
                if now_ms() > cmd.expires:  # it may have waited for a poll or a connect
                    return answer(WriteStatus.EXPIRED, "expired before it could be written")
                self.executed += 1
                await driver.write(point, cmd.value)
                after = await driver.read(_with_scale_factor(target.profile, point))
            settle = _settle(target.device)
            if settle and not _shows(target.profile, point, cmd.value, after):
                # A subscription reports the write late; polls need not wait for it. The
                # write is done: whatever happens now is a read-back that did not match,
                # never a failure an operator would retry (and so actuate twice).
                try:
                    async with asyncio.timeout(settle + 1.0), target.driver() as driver:
                        after = await _read_back(driver, target.profile, point, cmd.value, settle)
                except (TimeoutError, ProtocolError) as exc:
                    why = f"written; no read-back within {settle + 1.0:g}s ({exc or 'timeout'})"
                    return answer(WriteStatus.MISMATCH, why, previous=previous)
        except TimeoutError:
            return answer(
                WriteStatus.FAILED, f"no answer within {self._timeout:g}s", previous=previous
            )
        except ConfigError as exc:
            return answer(WriteStatus.REFUSED, str(exc), previous=previous)
        except ProtocolError as exc:
            return answer(WriteStatus.FAILED, f"{exc.reason}: {exc}", previous=previous)
        except Exception as exc:  # a driver bug must answer the command, not end the agent
            log.exception("write failed unexpectedly", extra={"device": device, "id": cmd.id})
            return answer(WriteStatus.FAILED, f"error: {type(exc).__name__}", previous=previous)
        value = after.values.get(point.name)
        if not _shows(target.profile, point, cmd.value, after):
            why = after.errors.get(point.name) or f"read back {value!r}"
            return answer(WriteStatus.MISMATCH, why, previous=previous, value=value)
        log.info(
            "point written",
            extra={"device": device, "point": point.name, "id": cmd.id, "value": value},
        )
        return answer(WriteStatus.OK, previous=previous, value=value)

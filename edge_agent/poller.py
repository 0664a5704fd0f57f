"""One poller per device: its own schedule, timeout, reconnection and health.

Ticks are scheduled on monotonic deadlines (``start + n * interval``) so there is no
drift; when a poll overruns, the ticks it covered are skipped and counted rather than
fired in a burst. Each poll is bounded by the device's ``timeout``, so a slow or dead
device never delays another (devices on one RS-485 line share the line's lock inside
the driver and so are polled in turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from prometheus_client import Counter

from device_profiles.schema import Point, Profile
from edge_agent.config import DeviceConfig
from edge_agent.metrics import AgentMetrics, driver_events
from iiot_common.backoff import Backoff, ConnState
from iiot_common.deadline import deadline_at
from protocols.driver import Driver, Reading, Value
from protocols.errors import ConnectError, ProtocolError

__all__ = ["DeviceHealth", "DevicePoller", "DriverFactory", "SampleSink", "StateSink"]

log = logging.getLogger("iiot.agent.poll")

DriverFactory = Callable[..., Driver]
SampleSink = Callable[[str, Reading], None]
StateSink = Callable[[str, bool, str], None]

_LAG_KEEP = 20000  # poll start lags kept for benchmarks
# One jitter source for every poller's backoffs: a Random each is 2.5 KB and a read of
# the system's entropy, times two per device.
_RNG = random.Random()


@dataclass(slots=True)
class DeviceHealth:
    online: bool | None = None  # None until the first poll decides
    reason: str = "starting"
    polls: int = 0
    good: int = 0
    skipped: int = 0


def _changed(point: Point | None, old: Value | None, new: Value) -> bool:
    if old is None or type(old) is not type(new):
        return True
    if isinstance(new, bool | str) or isinstance(old, bool | str):
        return new != old
    db = point.deadband if point is not None else None
    if db is None:
        return new != old
    return abs(float(new) - float(old)) > db


class DevicePoller:
    """Polls one device on its schedule and reports samples and state changes."""

    def __init__(
        self,
        device: DeviceConfig,
        profile: Profile,
        *,
        driver_factory: DriverFactory,
        on_sample: SampleSink,
        on_state: StateSink,
        metrics: AgentMetrics,
        backoff: Backoff | None = None,
        lags: deque[float] | None = None,
        phase: float = 0.0,
    ) -> None:
        self.device = device
        self.profile = profile
        self.points: Sequence[Point] = (
            [profile.point(n) for n in device.points] if device.points else list(profile.points)
        )
        self._by_name = {p.name: p for p in self.points}
        self._factory = driver_factory
        self._on_sample = on_sample
        self._on_state = on_state
        self.metrics = metrics
        self.backoff = backoff or Backoff(0.5, max(5.0, device.poll_interval * 4), rng=_RNG)
        # A device that stops answering (timeouts, not connection errors) is probed on
        # this backoff, each probe bounded by ``probe_limit``, so a dead unit on a shared
        # line does not hold the line for its full timeout every cycle.
        probe_max = max(device.probe_max, device.poll_interval)
        self.probe_backoff = Backoff(min(device.poll_interval, probe_max), probe_max, rng=_RNG)
        self._timeouts = 0  # timeouts in a row
        self.health = DeviceHealth()
        self.lags = lags if lags is not None else deque(maxlen=_LAG_KEEP)
        self._driver: Driver | None = None
        # The counters of the device's first driver, handed to every driver after it, so
        # that iiot_agent_driver_events_total never goes back on a reconnect and a closed
        # driver's late news (OPC UA items deleted after it gave up) still counts.
        self._stats: object | None = None
        # What drivers of another protocol counted before a change to this one.
        self._base: dict[str, int] = {}
        self._last_sent: dict[str, Value] = {}
        self._since_full = 0
        self._stop = asyncio.Event()
        # Held by a poll and by a write, so a write never interleaves with a poll.
        self._lock = asyncio.Lock()
        self._wakeup: asyncio.Future[None] | None = None
        # This device's metric children, looked up once rather than on every poll (a
        # labels() lookup costs several times the increment it leads to).
        self._m_duration = metrics.poll_duration
        self._m_ok = metrics.polls.labels(device.id, "ok")
        self._m_skipped = metrics.skipped_ticks.labels(device.id)
        self._m_suppressed = metrics.suppressed_samples.labels(device.id)
        self._m_errors: dict[str, Counter] = {}  # error reason -> child, as reasons are met
        self._closing: set[asyncio.Task[None]] = set()
        self._data_waiting = False  # a driver that pushes (subscribe mode) has new values
        # Fraction of the interval by which this device's grid is offset, so that many
        # devices with one interval do not all fire in the same instant.
        self.phase = phase % 1.0

    @contextlib.asynccontextmanager
    async def driver(self) -> AsyncIterator[Driver]:
        """The poller's own driver, connected, held against polls for the caller's block."""
        dev = self.device
        async with self._lock:
            if self._stop.is_set():
                raise ConnectError(f"device '{dev.id}': poller is stopping")
            if self._driver is None:
                self._driver, _own = await self._connect()
                self._listen(self._driver)
            yield self._driver

    def stop(self) -> None:
        self._stop.set()
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def run(self, epoch: float | None = None) -> None:
        """Poll until ``stop()``; never raises for device trouble.

        ``epoch`` (``time.monotonic()``) is where the grid starts, shared by pollers
        started together so that those of one phase wake in the same instant; default: now.
        """
        dev = self.device
        interval = dev.poll_interval
        start = (time.monotonic() if epoch is None else epoch) + self.phase * interval
        tick = 0
        try:
            while not self._stop.is_set():
                deadline = start + tick * interval
                wait = deadline - time.monotonic()
                if wait > 0:
                    if not self._data_waiting and await self._sleep(wait):
                        return
                    if self._data_waiting:
                        # A subscription brought values: hand them over now, then wait
                        # out the same tick.
                        self._hand_over_changes()
                        continue
                begun = time.monotonic()
                self.lags.append(begun - deadline)
                self.metrics.poll_lag.observe(max(0.0, begun - deadline))
                retry_in = await self._poll_once()
                if retry_in is not None:
                    # Connection trouble: wait out the backoff, then rejoin the grid.
                    if await self._sleep(retry_in):
                        return
                    tick = math.floor((time.monotonic() - start) / interval) + 1
                    continue
                nxt = tick + 1
                due = math.floor((time.monotonic() - start) / interval)
                if due >= nxt:
                    skipped = due - nxt + 1
                    self.health.skipped += skipped
                    self._m_skipped.inc(skipped)
                    nxt = due + 1
                tick = nxt
        finally:
            await self._close_driver()

    def _listen(self, driver: Driver) -> None:
        """Be told when a driver that pushes values (``on_data``) has new ones."""
        if hasattr(driver, "on_data") and hasattr(driver, "read_changes"):
            driver.on_data = self._data_arrived

    def _data_arrived(self) -> None:
        self._data_waiting = True
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _hand_over_changes(self) -> None:
        """The values a subscription brought since the last poll, as one sample."""
        self._data_waiting = False
        driver = self._driver
        if driver is None or self._lock.locked():
            return  # the next poll hands them over
        try:
            reading = driver.read_changes(self.points)  # type: ignore[attr-defined]
        except ProtocolError:
            return  # the next poll finds out and reports it
        if reading.values or reading.errors:
            try:
                self._emit(reading)
            except Exception:  # a sample that cannot be spooled must not end the poller
                log.exception("sample could not be spooled", extra={"device": self.device.id})

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, or return True at once when stopped."""
        if self._stop.is_set():
            return True
        # A bare future and timer: cheaper than a task per sleep, which adds up over
        # hundreds of devices polled many times a second.
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._wakeup = fut
        timer = loop.call_later(seconds, _wake, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._wakeup = None
        return self._stop.is_set()

    async def _poll_once(self) -> float | None:
        """One poll; returns a backoff delay when the connection must be retried."""
        dev = self.device
        self.health.polls += 1
        t0 = time.perf_counter()
        connecting = False
        probing = self.probing
        try:
            # The lock first: a poll waiting for a write (itself bounded) starts late
            # rather than failing, so a write never makes a device look offline.
            async with self._lock:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + (dev.probe_limit if probing else dev.timeout)
                if self._driver is None:
                    connecting = True
                    self.backoff.connecting()
                    driver, own = await self._connect(deadline)
                    self._driver = driver
                    connecting = False
                    self._listen(driver)
                    if own:
                        deadline = loop.time() + (dev.probe_limit if probing else dev.timeout)
                async with deadline_at(deadline, stretch=True):
                    reading = await self._driver.read(self.points)
        except TimeoutError:
            if connecting:
                return self._failed("connect_failed", "connect timed out", reconnect=True)
            return self._failed("timeout", "no answer within the poll timeout", reconnect=False)
        except ConnectError as exc:
            return self._failed(exc.reason, str(exc), reconnect=True, cause=exc.detail)
        except ProtocolError as exc:
            return self._failed(exc.reason, str(exc), reconnect=False, cause=exc.detail)
        except Exception as exc:  # a driver bug or garbage must not end the poller
            log.exception("poll failed unexpectedly", extra={"device": dev.id})
            return self._failed("error", f"{type(exc).__name__}: {exc}", reconnect=True)
        finally:
            self._m_duration.observe(time.perf_counter() - t0)
        self.backoff.succeeded()
        if self._timeouts:
            self._timeouts = 0
            self.probe_backoff.succeeded()
        self.health.good += 1
        self._m_ok.inc()
        for reason in reading.errors.values():
            self._error_metric(_short(reason)).inc()
        self._set_state(True, "")
        try:
            self._emit(reading)
        except Exception as exc:  # a sample that cannot be spooled must not end the poller
            log.exception("sample could not be spooled", extra={"device": dev.id})
            return self._failed("error", f"{type(exc).__name__}: {exc}", reconnect=False)
        return None

    def _failed(
        self, reason: str, detail: str, *, reconnect: bool, cause: str = ""
    ) -> float | None:
        """Count a failed poll and go offline with ``reason`` (``reason: cause`` in the state).

        The metric labels carry the bare reason (bounded); the state and the log carry
        the cause too, logged once per change.
        """
        self.metrics.polls.labels(self.device.id, reason).inc()
        self._error_metric(reason).inc()
        state = f"{reason}: {cause}" if cause else reason
        if self.health.online is not False or self.health.reason != state:
            log.warning(
                "device poll failed",
                extra={"device": self.device.id, "reason": reason, "detail": detail},
            )
        self._set_state(False, state)
        if reason == "timeout":
            self._timeouts += 1
            if self.probing:
                if self._timeouts == self.device.dead_after:
                    log.warning(
                        "device not answering: probing it on a backoff",
                        extra={"device": self.device.id, "timeouts": self._timeouts},
                    )
                return self.probe_backoff.next_delay()
        else:
            self._timeouts = 0
        if not reconnect:
            return None
        self.backoff.lost()
        driver, self._driver = self._driver, None
        if driver is not None:
            self._close_later(driver)
        return self.backoff.next_delay()

    def _error_metric(self, reason: str) -> Counter:
        """This device's error counter child for ``reason`` (a bounded label)."""
        child = self._m_errors.get(reason)
        if child is None:
            child = self._m_errors[reason] = self.metrics.errors.labels(self.device.id, reason)
        return child

    @property
    def probing(self) -> bool:
        """The device has timed out ``dead_after`` times in a row and is being probed."""
        return self._timeouts >= self.device.dead_after

    def _set_state(self, online: bool, reason: str) -> None:
        h = self.health
        if h.online is online and h.reason == reason:
            return
        h.online, h.reason = online, reason
        self.metrics.device_online.labels(self.device.id).set(1 if online else 0)
        if online:
            log.info("device online", extra={"device": self.device.id})
        self._on_state(self.device.id, online, reason)

    def _emit(self, reading: Reading) -> None:
        dev = self.device
        if not dev.report_on_change:
            self._on_sample(dev.id, reading)
            return
        self._since_full += 1
        if self._since_full >= dev.heartbeat_polls or not self._last_sent:
            self._since_full = 0
            self._last_sent.update(reading.values)
            self._on_sample(dev.id, reading)
            return
        changed = {
            k: v
            for k, v in reading.values.items()
            if _changed(self._by_name.get(k), self._last_sent.get(k), v)
        }
        if not changed and not reading.errors:
            self._m_suppressed.inc()
            return
        self._last_sent.update(changed)
        quality = {k: v for k, v in reading.quality.items() if k in changed}
        self._on_sample(dev.id, Reading(reading.ts, changed, dict(reading.errors), quality))

    async def _connect(self, deadline: float | None = None) -> tuple[Driver, float | None]:
        """Make and connect the device's driver; one that fails to connect is closed.

        A driver that gives its own connect_timeout connects within that (opening a session
        can take longer than a fast poll); others connect within ``deadline`` (loop time),
        if given. Returns the driver and its own connect limit, if any.
        """
        dev = self.device
        driver = self._factory(self.profile, dev.connection, name=dev.id)
        own = _connect_limit(driver)
        try:
            self._keep_stats(driver)
            if own:
                # asyncio.timeout, not the loop-turn deadline: under that one an OPC UA
                # session set-up past its connect_timeout came out as a poll timeout,
                # not connect_failed.
                async with asyncio.timeout(own):
                    await driver.connect()
            elif deadline is not None:
                async with deadline_at(deadline, stretch=True):
                    await driver.connect()
            else:
                await driver.connect()
        except BaseException:
            self._close_later(driver)
            raise
        return driver, own

    def driver_events(self) -> dict[str, int]:
        """What this device's drivers counted going wrong, since the poller started."""
        return _added(self._base, driver_events(self._stats))

    def keep_counters(self, old: DevicePoller) -> None:
        """Go on counting where ``old`` (this device's poller before a change) stopped."""
        self._stats, self._base = old._stats, old._base

    def _keep_stats(self, driver: Driver) -> None:
        """Give a new driver the device's counters (the first driver's own)."""
        stats = getattr(driver, "stats", None)
        if stats is None:
            return
        if type(self._stats) is type(stats):
            setattr(driver, "stats", self._stats)  # noqa: B010 - not part of the Driver protocol
        else:  # the first driver, or another protocol's: what the old ones counted stays
            self._base = _added(self._base, driver_events(self._stats))
            self._stats = stats

    def _close_later(self, driver: Driver) -> None:
        """Close in the background: a hung close must not hold the schedule."""
        task = asyncio.create_task(_close_quietly(driver))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_driver(self) -> None:
        driver, self._driver = self._driver, None
        if driver is not None:
            await _close_quietly(driver)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self.backoff.state = ConnState.STOPPED


def _added(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Two sets of event counts added up."""
    out = dict(a)
    for event, n in b.items():
        out[event] = out.get(event, 0) + n
    return out


def _connect_limit(driver: Driver) -> float | None:
    """The driver's own bound on ``connect()`` (its ``connect_timeout``), if it gives one."""
    limit = getattr(driver, "connect_timeout", None)
    return float(limit) if isinstance(limit, int | float) and limit > 0 else None


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _close_quietly(driver: Driver) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5.0):
            await driver.aclose()


def _short(reason: str) -> str:
    """A bounded metric label from a per-point error text, spelled as the payload spells it."""
    head = reason.split(":", 1)[0].strip().replace(" ", "_")
    return head[:40] or "error"

"""Deadlines that a busy event loop does not miss through its own lateness.

``asyncio.timeout`` cancels when its timer is due, and an event loop runs due timers
before it reads its sockets. When the loop is behind (thousands of devices, a starved
CPU), an answer that arrived well within the deadline can still be unread when the timer
fires, and the request counts as timed out: the device looks dead because the agent is
slow, the agent retries, reconnects and probes, and falls further behind.

``deadline_at`` lets the loop read first: when its timer fires it waits two more turns
of the loop (each turn polls the sockets), then cancels the block as ``asyncio.timeout``
does (``TimeoutError`` out of the block) if the block is still running. On a loop that
keeps up, that is a few microseconds past the deadline.

A block of several requests (a poll) is also held up between them when the loop is
behind. ``LoopLag`` measures that (how late a timer of its own runs, ten times a
second); a deadline made with ``stretch=True`` then moves by the time the loop lost
while the block ran (by at most ten times its limit), so what it bounds is the block's own
time, not the loop's backlog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType

__all__ = ["Deadline", "LoopLag", "deadline_after", "deadline_at"]

_TURNS = 2  # loop turns between the timer and the cancellation
_TICK = 0.1  # seconds between two measurements of the loop's lag
_STRETCH_MAX = 10  # a stretched deadline moves by at most this many times its limit
_NOISE = 0.005  # lateness below this is timer granularity, not a loop that is behind
_LAGS: dict[int, LoopLag] = {}  # id(loop) -> its running monitor


class LoopLag:
    """How far behind its schedule the running loop is: a timer's lateness, 10 times a second.

    ``lost`` adds up the lateness seen since the start (above timer granularity): the time
    the loop was too busy to run what was due. ``on_tick`` (if given) receives each measurement.
    """

    def __init__(self, on_tick: Callable[[float], None] | None = None) -> None:
        self.lag = 0.0  # lateness of the last tick, seconds
        self.lost = 0.0  # every tick's lateness together, seconds
        self._on_tick = on_tick
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    @staticmethod
    def of(loop: asyncio.AbstractEventLoop) -> LoopLag | None:
        """The monitor running on ``loop``, if any."""
        return _LAGS.get(id(loop))

    def start(self) -> None:
        """Measure on the running loop until ``stop()``."""
        self._loop = loop = asyncio.get_running_loop()
        _LAGS[id(loop)] = self
        self._due = loop.time() + _TICK
        self._handle = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._loop is not None and _LAGS.get(id(self._loop)) is self:
            del _LAGS[id(self._loop)]

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        self.lag = late = max(0.0, now - self._due)
        if late > _NOISE:
            self.lost += late
        if self._on_tick is not None:
            self._on_tick(late)
        self._due = now + _TICK
        self._handle = loop.call_at(self._due, self._tick)


class Deadline:
    """``async with``: ``TimeoutError`` when the block outlives ``when`` (loop time).

    Cancels and reports as ``asyncio.timeout`` does (a cancellation of the task from
    elsewhere passes through as ``CancelledError``), without its objects: a poll has two.
    """

    __slots__ = (
        "_cancelling",
        "_fired",
        "_handle",
        "_lag",
        "_loop",
        "_lost",
        "_spare",
        "_task",
        "_when",
    )

    def __init__(self, when: float | None, *, stretch: bool = False) -> None:
        self._when = when
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._fired = False
        self._handle: asyncio.Handle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lag: LoopLag | None = None
        self._lost = 0.0
        self._spare = 0.0  # how much further the deadline may still move
        if stretch:
            self._loop = loop = asyncio.get_running_loop()
            self._lag = lag = _LAGS.get(id(loop))
            self._lost = lag.lost if lag is not None else 0.0
            # At most by _STRETCH_MAX times the block's own limit: a loop that stays
            # behind delays a timeout (a dead device's), never indefinitely.
            limit = when - loop.time() if when is not None else 0.0
            # (A deadline already due when made, after a slow connect, still gets some.)
            self._spare = _STRETCH_MAX * max(limit, _TICK)

    async def __aenter__(self) -> Deadline:
        loop = self._loop
        if loop is None:
            self._loop = loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a deadline works inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        if self._when is not None:
            self._handle = loop.call_at(self._when, self._turn, _TURNS)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()
        task, self._task = self._task, None
        if self._fired and task is not None:
            # Ours unless someone else cancelled the task meanwhile, as asyncio.timeout.
            if task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def expired(self) -> bool:
        """Whether the deadline cancelled the block."""
        return self._fired

    def _turn(self, left: int) -> None:
        task, loop = self._task, self._loop
        if task is None or loop is None:
            return  # the block is over
        if left > 0:
            self._handle = loop.call_soon(self._turn, left - 1)
            return
        lag = self._lag
        if lag is not None and lag.lost > self._lost and self._spare > 0:
            # The loop lost time while the block ran: the deadline moves by as much.
            assert self._when is not None
            move = min(lag.lost - self._lost, self._spare)
            self._when += move
            self._spare -= move
            self._lost = lag.lost
            self._handle = loop.call_at(self._when, self._turn, _TURNS)
            return
        self._handle = None
        self._fired = True
        task.cancel()


def deadline_at(when: float | None, *, stretch: bool = False) -> Deadline:
    """A deadline at ``when`` (the running loop's time); None: none.

    ``stretch``: moved by the time the loop loses meanwhile (see ``LoopLag``).
    """
    return Deadline(when, stretch=stretch)


def deadline_after(delay: float | None, *, stretch: bool = False) -> Deadline:
    """A deadline ``delay`` seconds from now; None: none. ``stretch``: as ``deadline_at``."""
    if delay is None:
        return Deadline(None)
    return Deadline(asyncio.get_running_loop().time() + delay, stretch=stretch)

"""Polling until a condition holds: one helper for synchronous tests, one for asyncio tests."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

__all__ = ["wait_for", "wait_until"]


def _timed_out(cond: object, timeout: float, what: str) -> AssertionError:
    return AssertionError(f"timed out after {timeout}s waiting for {what or cond}")


def wait_until(
    cond: Callable[[], bool], timeout: float = 15.0, what: str = "", interval: float = 0.05
) -> None:
    """Block until ``cond()`` is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    raise _timed_out(cond, timeout, what)


async def wait_for(
    cond: Callable[[], bool | Awaitable[bool]],
    within: float = 10.0,
    what: str = "",
    interval: float = 0.02,
) -> None:
    """Await until ``cond()`` (plain or a coroutine) is true; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got = cond()
        if await got if inspect.isawaitable(got) else got:
            return
        await asyncio.sleep(interval)
    raise _timed_out(cond, within, what)

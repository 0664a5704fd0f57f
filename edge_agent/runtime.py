"""What the agent process sets up before its event loop: the loop itself and its file limit.

The loop is uvloop by default (``iiot agent run --loop``, or ``IIOT_AGENT_LOOP``): a poll
costs noticeably less CPU on it, at thousands of devices a large share of a core. Plain
asyncio is the choice where uvloop is not installed (Windows) or not wanted.

Each Modbus TCP peer and OPC UA server takes a socket, so thousands of devices need
thousands of open files: at start the soft ``RLIMIT_NOFILE`` is raised to the hard one,
and when even that is too low for the configured devices, one log line says so.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Coroutine
from enum import StrEnum
from typing import Any, TypeVar

__all__ = ["FILES_PER_AGENT", "LoopKind", "raise_open_files", "run_on", "settle_heap"]

log = logging.getLogger("iiot.agent")

T = TypeVar("T")

# Files the agent holds besides its devices' connections: the spool's database and
# write-ahead log, the broker connection, the metrics endpoint, logs, worker threads'
# wake-up pipes; with room to spare for reconnects, whose old sockets close late.
FILES_PER_AGENT = 64


class LoopKind(StrEnum):
    """The event loop the agent runs on."""

    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


def _loop_factory(kind: LoopKind) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for plain asyncio (also when uvloop is missing)."""
    if kind is LoopKind.ASYNCIO:
        return None
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed: the agent runs on plain asyncio")
        return None
    return uvloop.new_event_loop


def run_on(kind: LoopKind, main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new event loop of ``kind``."""
    with asyncio.Runner(loop_factory=_loop_factory(kind)) as runner:
        return runner.run(main)


# When the objects made at start are moved out of the collector's way: now, and again
# once every device has been polled (its driver, plan and metric children made).
_FREEZE_AFTER = (0.0, 10.0, 60.0)  # seconds
# Allocations between two young-generation collections (Python's default is 700): a poll
# makes a few hundred short-lived objects that reference counting frees anyway.
_GC_GEN0 = 20_000


def settle_heap(loop: asyncio.AbstractEventLoop) -> None:
    """Keep the cyclic garbage collector off the objects that live as long as the agent.

    At thousands of devices the agent holds millions of objects (configs, profiles,
    pollers, drivers, metric children) that never become garbage; a full collection
    walks them all, for a second and more with the loop stopped, and every device then
    looks late. ``gc.freeze()`` moves them out of the collector's generations.
    """
    gc.set_threshold(_GC_GEN0, *gc.get_threshold()[1:])
    for delay in _FREEZE_AFTER:
        loop.call_later(delay, _collect_and_freeze)


def _collect_and_freeze() -> None:
    # The young garbage first: a cycle frozen while already garbage would never be
    # freed. Not a full collection, which at thousands of devices stops the loop for
    # as long as the freeze is there to avoid.
    gc.collect(1)
    gc.freeze()


def raise_open_files(devices: int) -> tuple[int, int] | None:
    """Raise the soft open-file limit to the hard one; the limits (soft, hard) now.

    Logs one warning when the limit is still below what ``devices`` connections and the
    agent's own files need. None where the platform has no such limit (Windows).
    """
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard
        if hard == resource.RLIM_INFINITY:
            # An unlimited hard limit still caps the soft one at the kernel's nr_open.
            target = max(soft, min(_nr_open(), 1 << 20))
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("open-file limit could not be raised", extra={"error": str(exc)})
    needed = devices + FILES_PER_AGENT
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open-file limit too low for the configured devices, some will fail to connect: "
            "raise it (systemd LimitNOFILE=, shell ulimit -n)",
            extra={"limit": soft, "hard_limit": hard, "needed": needed, "devices": devices},
        )
    return soft, hard


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return 1 << 20

"""Every edge-agent test must leave no thread and no asyncio task behind."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest


@pytest.fixture(autouse=True)
def _no_leftover_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3.0
    while True:
        extra = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith("asyncio_")
        ]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not extra, f"threads left running: {[t.name for t in extra]}"


@pytest.fixture(autouse=True)
async def _no_leftover_tasks() -> AsyncIterator[None]:
    yield
    current = asyncio.current_task()
    for _ in range(50):
        left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if not left:
            break
        await asyncio.sleep(0.02)
    assert not left, f"tasks left running: {[t.get_name() for t in left]}"

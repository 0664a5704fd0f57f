"""Deadlines that a busy event loop does not miss through its own lateness."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from iiot_common.deadline import LoopLag, deadline_after, deadline_at


async def test_a_block_that_outlives_its_deadline_gets_timeout_error() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with deadline_after(0.05):
            await asyncio.sleep(5)
    assert time.monotonic() - started < 1.0


async def test_a_block_within_its_deadline_is_left_alone_and_none_means_no_deadline() -> None:
    async with deadline_after(1.0) as d:
        await asyncio.sleep(0.01)
    assert not d.expired()
    async with deadline_at(None) as d:
        await asyncio.sleep(0.01)
    assert not d.expired()


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    async def block() -> None:
        async with deadline_after(10.0):
            await asyncio.sleep(5)

    task = asyncio.create_task(block())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _answer_then_hold_up(use: str) -> bool:
    """Whether a read gets an answer that arrives in time while the loop is then held up.

    The answer is in the socket 20 ms into a 50 ms deadline, but the loop is busy until
    120 ms: its deadline's timer is due by the time the loop reads the socket.
    """
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)

    def answer_then_hold_up() -> None:
        theirs.send(b"ok")
        time.sleep(0.1)

    loop.call_later(0.02, answer_then_hold_up)
    try:
        limit = deadline_after(0.05) if use == "deadline" else asyncio.timeout(0.05)
        async with limit:
            return await reader.read(2) == b"ok"
    except TimeoutError:
        return False
    finally:
        writer.close()
        theirs.close()


async def test_an_answer_that_arrived_before_the_deadline_counts_though_the_loop_was_busy() -> None:
    assert await _answer_then_hold_up("deadline")
    # asyncio.timeout takes the same answer for none.
    assert not await _answer_then_hold_up("asyncio")


async def _held_up_block(stretch: bool) -> bool:
    """Whether a block of 0.2 s of its own, on a loop then held up for 0.3 s, meets 0.35 s."""
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, time.sleep, 0.3)
    try:
        async with deadline_after(0.35, stretch=stretch):
            for _ in range(2):  # two steps of a poll: the first waits out the held-up loop
                await asyncio.sleep(0.1)
    except TimeoutError:
        return False
    return True


async def test_a_stretched_deadline_moves_by_the_time_the_loop_lost() -> None:
    lag = LoopLag()
    lag.start()
    try:
        await asyncio.sleep(0.05)
        assert await _held_up_block(stretch=True)
        assert lag.lost >= 0.2
        # Not stretched, the same block runs out of time.
        assert not await _held_up_block(stretch=False)
    finally:
        lag.stop()
    assert LoopLag.of(asyncio.get_running_loop()) is None


async def _stretched_block(limit: float) -> tuple[bool, float]:
    """(whether the deadline fired, seconds the block ran) for a block that never ends."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = deadline_after(limit, stretch=True)
    try:
        async with deadline:
            await asyncio.sleep(60)
    except TimeoutError:
        pass
    return deadline.expired(), loop.time() - started


async def test_a_stretched_deadline_moves_by_at_most_ten_times_its_limit() -> None:
    """A loop that never catches up delays a dead device's timeout, but not indefinitely."""
    loop = asyncio.get_running_loop()
    lag = LoopLag()
    lag.start()
    begun = loop.time()
    handle: list[asyncio.TimerHandle] = []

    def losing_everything() -> None:
        # A loop that loses more than all its time: every turn, the deadline may move.
        lag.lost = loop.time() - begun + 1.0
        handle[:] = [loop.call_later(0.01, losing_everything)]

    losing_everything()
    task = asyncio.create_task(_stretched_block(0.2))
    try:
        done, _ = await asyncio.wait([task], timeout=8.0)
        assert done, "a stretched deadline on a loop that never catches up never fired"
        fired, took = task.result()
    finally:
        task.cancel()
        handle[0].cancel()
        lag.stop()
    assert fired
    # 0.2 s, moved by ten times that, and a few loop turns.
    assert 2.0 <= took < 2.2 + 1.5, took

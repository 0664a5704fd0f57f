"""A device that goes silent while the agent's loop lags is still declared offline in time.

The agent stretches a poll's deadline by the time its event loop loses
(``iiot_common.deadline``), so that a late answer is not taken for none. A device that
really stopped answering must not profit from that: the stretch is capped at
``_STRETCH_MAX`` times the poll's own limit, which gives the bound asserted here. The
agent runs in the test's process and loop, which a timer callback holds up on a fixed
schedule; one device then falls silent (its simulator keeps the connection and answers
nothing) or its simulator process is killed.

At this lag it is not the cap that ends the stretch: the loop's lost time grows by less
than the time that passes (a lag measurement comes 0.1 s after the previous one ran), so
a deadline ends after about ten measurements per second of its limit. The cap binds when
the loop stalls for more than about a second at a time; ``tests/test_deadline.py``
checks it on its own. What this test catches is a deadline that keeps being stretched
while the loop lags, which a device that went silent would never get past.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from device_profiles.loader import load_profiles
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from iiot_common.deadline import _STRETCH_MAX
from iiot_common.localservers import Mosquitto, free_port, wait_port
from protocols.driver import now_ms
from protocols.mqtt.contract import DeviceState
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from tests.edge_agent.helpers import Subscriber, agent_dict, modbus_device
from tests.edge_agent.test_overload import _PROFILE, _failed_polls, _profiles
from tests.waiting import wait_for

_OTHERS = 3  # devices that keep answering throughout
_INTERVAL = 0.5  # poll interval, seconds
_POLL_TIMEOUT = 0.3  # bound on one poll before any stretch, seconds
# A request timeout far above the poll's bound, so that what declares a silent device
# failed is the poll's stretched deadline, the thing under test (as with the default 1 s
# request timeout and a sub-second poll_timeout), not the driver's own request timeout.
_REQUEST_TIMEOUT = 10.0
# The lag: every _HOG_PERIOD the loop is blocked for _HOG_BLOCK (a callback on a fixed
# grid of the loop's clock, so the load is the same on every run and every machine; a
# loaded machine only adds to it). 75 % of the loop's time is gone, so nearly every lag
# measurement is late and every poll's deadline is stretched, while the free quarter is
# enough for four devices every half second.
_HOG_BLOCK = 0.15
_HOG_PERIOD = 0.2
# From the device falling silent to its offline state at the subscriber:
#   the next tick (one interval, late by at most one block),
#   the poll's deadline plus its stretch, at most _STRETCH_MAX times the deadline,
#   the timer that fires late and the two loop turns before it cancels (a block each),
#   and the state message's way through the broker on a loaded machine.
_DELIVERY = 2.0
_OFFLINE_BOUND = (
    _INTERVAL + _POLL_TIMEOUT * (1 + _STRETCH_MAX) + 4 * _HOG_BLOCK + _DELIVERY
)  # fmt: skip
# Longest wait between two samples of a device that answers: a tick, late by a block,
# then a poll that may itself be stretched to its bound.
_MAX_GAP = _INTERVAL + _POLL_TIMEOUT * (1 + _STRETCH_MAX) + 4 * _HOG_BLOCK
_AFTER = 2.0  # seconds the others are watched after the silent device went offline


class _LoopHog:
    """Blocks the running loop for ``block`` seconds at the start of every ``period``."""

    def __init__(self, block: float, period: float) -> None:
        self.block = block
        self.period = period
        self._handle: asyncio.TimerHandle | None = None
        self._next = 0.0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._next = loop.time() + self.period
        self._handle = loop.call_at(self._next, self._fire)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        time.sleep(self.block)  # blocking the loop is the point
        loop = asyncio.get_running_loop()
        self._next += self.period
        now = loop.time()
        if self._next < now:  # a slot missed on a loaded machine is skipped, not doubled
            self._next += (int((now - self._next) / self.period) + 1) * self.period
        self._handle = loop.call_at(self._next, self._fire)


@contextmanager
def _hogged() -> Iterator[_LoopHog]:
    hog = _LoopHog(_HOG_BLOCK, _HOG_PERIOD)
    hog.start()
    try:
        yield hog
    finally:
        hog.stop()


def _states(sub: Subscriber, device: str) -> list[DeviceState]:
    return [m.decoded for m in sub.on(f"/{device}/state") if isinstance(m.decoded, DeviceState)]


def _device(dev_id: str, port: int) -> dict[str, object]:
    return modbus_device(
        dev_id, _PROFILE, port, interval=_INTERVAL, poll_timeout=_POLL_TIMEOUT,
        modbus={"host": "127.0.0.1", "port": port, "unit": 1, "timeout": _REQUEST_TIMEOUT,
                "retries": 0},
    )  # fmt: skip


def _assert_others_delivered(sub: Subscriber, agent: Agent, others: list[str], until: int) -> None:
    """Every answering device: no failed poll, never offline, no seq gap, no long wait."""
    failed = _failed_polls(agent)
    assert {d: failed.get(d, 0) for d in others} == dict.fromkeys(others, 0)
    for d in others:
        assert all(s.online for s in _states(sub, d)), f"{d} went offline: {_states(sub, d)}"
        got = sorted(sub.samples(d), key=lambda x: x[0])
        seqs = [seq for seq, _ in got]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{d}: seq gap in {seqs}"
        ts = [s.ts for _, s in got]
        gaps = [(b - a) / 1000 for a, b in itertools.pairwise(ts)]
        assert max(gaps) <= _MAX_GAP, f"{d}: {max(gaps):.2f} s without a sample"
        assert ts[-1] >= until, f"{d}: no sample after the silent device went offline"


@dataclass(frozen=True)
class _Outcome:
    took: float  # seconds from the device falling silent to its offline state
    state: DeviceState  # that state
    offline_at: int  # when it was seen, Unix ms
    lagged: float  # seconds the loop lost while it was held up
    span: float  # seconds it was held up


async def _silence_on_a_lagging_loop(
    sub: Subscriber, agent: Agent, victim: str, others: list[str], silence: Callable[[], object]
) -> _Outcome:
    """Hold the loop up, silence ``victim``, wait for its offline state, watch the others."""
    with _hogged():
        lost0, t_hog = agent.loop_lag.lost, time.monotonic()
        await wait_for(
            lambda: all(len(sub.samples(d)) >= 3 for d in [victim, *others]), 15, "first data"
        )
        t0 = time.monotonic()
        silence()
        await wait_for(
            lambda: any(not s.online for s in _states(sub, victim)),
            _OFFLINE_BOUND,
            f"{victim} offline within the bound of {_OFFLINE_BOUND:.2f} s",
        )
        took, offline_at = time.monotonic() - t0, now_ms()
        await asyncio.sleep(_AFTER)
        lagged, span = agent.loop_lag.lost - lost0, time.monotonic() - t_hog
    state = next(s for s in _states(sub, victim) if not s.online)
    return _Outcome(took, state, offline_at, lagged, span)


def _assert_lagged(out: _Outcome) -> None:
    """The loop really was behind all along (so every deadline was being stretched)."""
    assert out.lagged >= 0.25 * out.span, f"loop lost {out.lagged:.2f} s of {out.span:.2f} s"


async def test_a_silent_device_on_a_lagging_loop_goes_offline_within_its_stretched_bound(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    folder = _profiles(tmp_path / "profiles")
    profile = load_profiles([folder])[_PROFILE]
    ids = ["silent", *(f"meter-{i}" for i in range(_OTHERS))]
    sims = {d: ModbusSimServer({1: SimDevice(profile, device_id=d, seed=i)}, port=0)
            for i, d in enumerate(ids)}  # fmt: skip
    for sim in sims.values():
        await sim.start()
    devices = [_device(d, sims[d].port) for d in ids]
    agent = Agent(
        parse_config(agent_dict(tmp_path, mosquitto.port, devices, profiles=[str(folder)]))
    )
    with Subscriber(mosquitto.port) as sub:
        await agent.start()
        try:
            # The simulator keeps the TCP connection open and reads every request, but
            # answers none: a device that hung, or a peer that accepts and is mute.
            faults = sims["silent"].devices[1].faults
            out = await _silence_on_a_lagging_loop(
                sub, agent, "silent", ids[1:], lambda: faults.set("silent")
            )
        finally:
            await agent.stop()
            for sim in sims.values():
                await sim.stop()
        _assert_others_delivered(sub, agent, ids[1:], out.offline_at)
    _assert_lagged(out)
    assert out.state.reason == "timeout", out.state


async def test_a_killed_simulator_on_a_lagging_loop_goes_offline_within_the_bound(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    folder = _profiles(tmp_path / "profiles")
    profile = load_profiles([folder])[_PROFILE]
    others = [f"meter-{i}" for i in range(_OTHERS)]
    sims = [ModbusSimServer({1: SimDevice(profile, device_id=d, seed=i)}, port=0)
            for i, d in enumerate(others)]  # fmt: skip
    for sim in sims:
        await sim.start()
    port = free_port()
    # The victim is a simulator process of its own, killed with SIGKILL: no goodbye.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "iiot", "sim", "run", "--profile", _PROFILE, "--profiles",
        str(folder), "--port", str(port), "--id", "killed",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        await asyncio.to_thread(wait_port, port, 30.0)
        devices = [
            _device("killed", port),
            *(_device(d, s.port) for d, s in zip(others, sims, strict=True)),
        ]
        cfg = agent_dict(tmp_path, mosquitto.port, devices, profiles=[str(folder)])
        agent = Agent(parse_config(cfg))
        with Subscriber(mosquitto.port) as sub:
            await agent.start()
            try:
                out = await _silence_on_a_lagging_loop(
                    sub, agent, "killed", others, lambda: os.kill(proc.pid, signal.SIGKILL)
                )
            finally:
                await agent.stop()
            _assert_others_delivered(sub, agent, others, out.offline_at)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        for sim in sims:
            await sim.stop()
    _assert_lagged(out)
    # The peer's socket closed with the process: the agent sees the connection go.
    assert out.state.reason.startswith(("connect_failed", "timeout")), out.state

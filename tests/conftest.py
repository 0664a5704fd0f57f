"""Shared fixtures: real servers on loopback, started and stopped per test."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from iiot_common.localservers import (
    Mosquitto,
    PostgreSQL,
    PtyPair,
    ServerUnavailable,
    VictoriaMetrics,
    free_port,
)

# Property tests check what the code does, not how fast: no per-example deadline and no
# too-slow health check, which a loaded machine trips at random (as "Flaky" or a failed
# health check). Tests that set their own settings keep these unless they say otherwise.
settings.register_profile("iiot", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("iiot")


def pytest_collection_finish() -> None:
    """Keep what collection imported out of the garbage collector's full passes.

    A full pass over the whole suite's modules takes from a fifth of a second to seconds on
    a loaded machine, a pause that lands in whichever timed test is running; frozen, a
    pass walks what the tests themselves made.
    """
    gc.collect()
    gc.freeze()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A server whose Debian package cannot be installed here skips the test, naming it."""
    report = yield
    if call.excinfo is not None and call.excinfo.errisinstance(ServerUnavailable):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {call.excinfo.value}")
    return report


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """An anonymous Mosquitto broker on a free loopback port."""
    d = tmp_path / "mosquitto"
    d.mkdir()
    broker = Mosquitto(d).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgreSQL]:
    """One PostgreSQL on a free loopback port for the whole session; tests take databases."""
    server = PostgreSQL().start()
    yield server
    server.stop()


@pytest.fixture
def registry_url(tmp_path: Path) -> str:
    """The registry's database: SQLite here; the registry's own tests take both databases."""
    return f"sqlite:///{tmp_path / 'registry.db'}"


@pytest.fixture
def victoria(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    """victoria-metrics on a free loopback port, speaking the InfluxDB v2 write API."""
    d = tmp_path / "victoria"
    d.mkdir()
    vm = VictoriaMetrics(d).start()
    yield vm
    vm.stop()


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[PtyPair]:
    """A linked pair of pseudo-terminals (socat) for Modbus RTU over a serial line."""
    pair = PtyPair(tmp_path).start()
    yield pair
    pair.stop()


@pytest.fixture
def port() -> int:
    return free_port()


# Tasks a third-party library leaves running by design, matched by the start of the task's name.
_TOLERATED_TASKS: tuple[str, ...] = ()


def _leftovers(me: asyncio.Task[Any] | None) -> list[str]:
    """Names of tasks still running and timers still scheduled on the running loop."""
    loop = asyncio.get_running_loop()
    names = [
        t.get_name()
        for t in asyncio.all_tasks()
        if t is not me and not t.done() and not t.get_name().startswith(_TOLERATED_TASKS)
    ]
    # asyncio keeps call_later timers in the private _scheduled heap; cancelled ones linger there
    # until the loop drops them, so only live ones count.
    timers = getattr(loop, "_scheduled", [])
    names += [f"timer {h!r}" for h in timers if not h.cancelled()]
    return names


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks or timers behind (drivers, clients, pollers)."""
    yield
    me = asyncio.current_task()
    left: list[str] = []
    for _ in range(100):  # bounded: tasks that are finishing get up to a second
        left = _leftovers(me)
        if not left:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"tasks left behind: {left}")


@pytest.fixture(scope="module")
def opcua_certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed server and client certificate pair for Basic256Sha256."""
    from protocols.opcua.certs import (
        CLIENT_APPLICATION_URI,
        SERVER_APPLICATION_URI,
        generate_certificate,
    )

    d = tmp_path_factory.mktemp("opcua-certs")
    server_cert, server_key = generate_certificate(
        d / "server.der", d / "server.pem", application_uri=SERVER_APPLICATION_URI
    )
    client_cert, client_key = generate_certificate(
        d / "client.der", d / "client.pem", application_uri=CLIENT_APPLICATION_URI
    )
    return {
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
    }

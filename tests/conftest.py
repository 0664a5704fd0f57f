"""Shared fixtures: real servers on loopback, started and stopped per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import Mosquitto, PtyPair, VictoriaMetrics, free_port


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """An anonymous Mosquitto broker on a free loopback port."""
    d = tmp_path / "mosquitto"
    d.mkdir()
    broker = Mosquitto(d).start()
    yield broker
    broker.stop()


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

"""Instances sharing a database: what a refresh pass reads and applies, and what queries
count while one runs. On SQLite and PostgreSQL unless marked."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from gateway.api import create_app
from gateway.registry import Registry, parse_ledger
from gateway.registry import tables as t
from gateway.registry.index import DeviceIndex, IndexView
from gateway.registry.store import _DeviceRows
from gateway.registry.views import AnswerCache
from iiot_common.localservers import PostgreSQL
from protocols.mqtt.contract import DeviceState
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_api import PLATFORM, make_config
from tests.gateway.test_registry_fixtures import POLL_S, T0, agent_of, device_rows, populate

registry_url = _fx.both_registry_urls
registry = _fx.registry
hebei = _fx.hebei

# Devices online at T0 in the shared fixture: fresh samples, device and agent up.
ONLINE = [r for r in device_rows() if r["k"] in (0, 1, 2, 5, 6, 7, 8)]
WAIT_S = 30.0


class _PausingRegistry(Registry):
    """Stops a refresh pass half-way through applying its rows, holding the registry's
    lock, until the test lets it go on."""

    pause_after = 0

    def __init__(self, url: str, **kw: Any) -> None:
        super().__init__(url, **kw)
        self.halfway = threading.Event()
        self.go_on = threading.Event()
        self._applied = 0

    def _apply_device_row(self, i: int, r: tuple[Any, ...]) -> None:
        super()._apply_device_row(i, r)
        self._applied += 1
        if self._applied == self.pause_after:
            self.halfway.set()
            assert self.go_on.wait(WAIT_S)


class _ReadThenWait(Registry):
    """Stops a refresh pass between reading its rows and applying them."""

    def __init__(self, url: str, **kw: Any) -> None:
        super().__init__(url, **kw)
        self.armed = False
        self.read_done = threading.Event()
        self.go_on = threading.Event()

    def _prepare_devices(
        self, rows: list[tuple[Any, ...]], times: list[tuple[Any, ...]]
    ) -> _DeviceRows:
        if self.armed:
            self.read_done.set()
            assert self.go_on.wait(WAIT_S)
        return super()._prepare_devices(rows, times)


@pytest.fixture
def writer(registry_url: str) -> Iterator[Registry]:
    """The instance where everything happens (it writes each change at its next flush)."""
    reg = Registry(registry_url, default_poll_interval=POLL_S, persist_granularity=0.001)
    yield reg
    reg.close()


def _go_offline(reg: Registry, rows: list[dict[str, Any]], reason: str = "unplugged") -> None:
    for r in rows:
        ent = r["enterprise"]
        state = DeviceState(online=False, ts=T0, reason=reason)
        reg.on_device_state(ent, agent_of(ent), r["device_id"], state)


def _online(client: TestClient) -> int:
    r = client.get("/api/v1/ratios?group_by=city", headers=PLATFORM)
    assert r.status_code == 200
    return int(r.json()["overall"]["online"])


def test_a_query_during_a_refresh_pass_counts_all_of_it_or_none_and_never_waits(
    registry_url: str, writer: Registry
) -> None:
    populate(writer)
    writer.flush()
    # A long view age: the live query below must not depend on a view taken meanwhile.
    reader = _PausingRegistry(registry_url, default_poll_interval=POLL_S, view_max_age=WAIT_S)
    try:
        _count_during_a_pass(reader, writer)
    finally:
        reader.close()


def _count_during_a_pass(reader: _PausingRegistry, writer: Registry) -> None:
    reader.refresh()
    app = create_app(reader, make_config(), clock=lambda: T0 / 1000)
    with TestClient(app) as client:
        before = _online(client)
        assert before == len(ONLINE)
        _go_offline(writer, ONLINE)
        writer.flush()
        reader.pause_after = 3  # of the seven state changes
        passing = threading.Thread(target=reader.refresh)
        passing.start()
        try:
            assert reader.halfway.wait(WAIT_S)
            # The pass holds the lock with three of seven devices applied: the query is
            # answered anyway, from the state before the pass.
            assert _online(client) == before
        finally:
            reader.go_on.set()
            passing.join(WAIT_S)
        assert not passing.is_alive()
        # The pass published a new view as it finished: all seven are offline at once.
        assert _online(client) == 0


def test_a_flush_between_a_pass_reading_and_applying_keeps_the_newer_local_state(
    registry_url: str, writer: Registry
) -> None:
    populate(writer)
    writer.flush()
    reader = _ReadThenWait(registry_url, default_poll_interval=POLL_S, persist_granularity=0.001)
    try:
        reader.refresh()
        dev = ONLINE[0]
        ent, dev_id = dev["enterprise"], dev["device_id"]
        # The other instance changes the device's state report; the pass will read it.
        state = DeviceState(online=True, ts=T0 - 1000, reason="polled")
        writer.on_device_state(ent, agent_of(ent), dev_id, state)
        writer.flush()
        # Here the device goes offline afterwards: newer than what the pass reads.
        _go_offline(reader, [dev])
        reader.armed = True
        passing = threading.Thread(target=reader.refresh)
        passing.start()
        try:
            assert reader.read_done.wait(WAIT_S)
            reader.armed = False
            # The flush does not wait for the pass, and commits the newer state.
            flushing = threading.Thread(target=reader.flush)
            flushing.start()
            flushing.join(WAIT_S)
            assert not flushing.is_alive()
        finally:
            reader.go_on.set()
            passing.join(WAIT_S)
        seen = reader.get_device(ent, dev_id)
        assert seen is not None and (seen["online"], seen["state_reason"]) == (False, "unplugged")
        # The next passes read it back from the database as this instance wrote it, and
        # the other instance takes it too.
        reader.refresh()
        writer_view = Registry(registry_url, default_poll_interval=POLL_S)
        try:
            again = reader.get_device(ent, dev_id)
            there = writer_view.get_device(ent, dev_id)
            assert again is not None and again["state_reason"] == "unplugged"
            assert there is not None and there["state_reason"] == "unplugged"
        finally:
            writer_view.close()
    finally:
        reader.close()


def test_when_nothing_changes_a_pass_reads_nothing(registry_url: str, writer: Registry) -> None:
    populate(writer)
    writer.flush()
    reader = Registry(registry_url, default_poll_interval=POLL_S)
    reader.refresh_overlap_ms = 200
    try:
        assert reader.get_device(ONLINE[0]["enterprise"], ONLINE[0]["device_id"]) is not None
        time.sleep(0.3)  # past the overlap: the rows written before the start are old
        reader.refresh()
        time.sleep(0.3)
        assert reader.refresh() == 0
        _go_offline(writer, ONLINE[:1])
        writer.flush()
        assert reader.refresh() > 0
        time.sleep(0.3)
        reader.refresh()
        assert reader.refresh() == 0
    finally:
        reader.close()


def test_an_api_write_is_counted_by_the_next_live_query(hebei: Registry) -> None:
    app = create_app(hebei, make_config(), clock=lambda: T0 / 1000)
    with TestClient(app) as client:
        r = client.get("/api/v1/ratios", headers=PLATFORM)
        total = r.json()["overall"]["total"]
        assert client.get("/api/v1/ratios", headers=PLATFORM).json()["overall"]["total"] == total
        rows, _ = parse_ledger(b"device_id,enterprise,family\nnew-1,hb-steel,boiler\n", "text/csv")
        assert hebei.import_devices(rows).created == 1
        # No waiting for the view to age: an API write is counted at once.
        r = client.get("/api/v1/ratios", headers=PLATFORM)
        assert r.json()["overall"]["total"] == total + 1


def test_a_transaction_committing_after_a_newer_one_was_read_is_read_once(
    postgres_server: PostgreSQL,
) -> None:
    url = postgres_server.create_database()
    writer = Registry(url, default_poll_interval=POLL_S, persist_granularity=0.001)
    reader = Registry(url, default_poll_interval=POLL_S)
    late_conn = writer.engine.connect()
    try:
        populate(writer)
        writer.flush()
        reader.refresh()
        # Stamps alone, without an overlap, would miss a change committed late.
        reader.refresh_overlap_ms = 0
        first, second = device_rows()[40], ONLINE[0]
        late = late_conn.begin()
        c = t.devices.c
        late_conn.execute(
            t.devices.update()
            .where(c.enterprise == first["enterprise"], c.id == first["device_id"])
            .values(name="renamed late")
        )
        _go_offline(writer, [second])
        writer.flush()  # begun after the late transaction, committed before it
        # The second device's change: its whole row and its times row; not the first's.
        assert reader.refresh() == 2
        late.commit()
        assert reader.refresh() == 2  # the late change, and nothing read again
        assert reader.refresh() == 0
        seen = reader.get_device(first["enterprise"], first["device_id"])
        assert seen is not None and seen["name"] == "renamed late"
        other = reader.get_device(second["enterprise"], second["device_id"])
        assert other is not None and other["online"] is False
    finally:
        late_conn.close()
        reader.close()
        writer.close()


def test_a_version_7_database_on_postgresql_gets_transaction_stamps(
    postgres_server: PostgreSQL,
) -> None:
    url = postgres_server.create_database()
    with Registry(url, default_poll_interval=POLL_S) as reg:
        populate(reg)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for index in ("ix_devices_updated_xid", "ix_devices_state_xid"):
            conn.exec_driver_sql(f"DROP INDEX {index}")
        for column in ("updated_xid", "state_xid"):
            conn.exec_driver_sql(f"ALTER TABLE devices DROP COLUMN {column}")
        conn.execute(t.schema_version.delete().where(t.schema_version.c.version > 7))
    engine.dispose()
    writer = Registry(url, default_poll_interval=POLL_S, persist_granularity=0.001)
    reader = Registry(url, default_poll_interval=POLL_S)
    reader.refresh_overlap_ms = 0  # only the device row: its whole row and times row
    try:
        _go_offline(writer, ONLINE[:1])
        writer.flush()
        assert reader.refresh() == 2
        dev = reader.get_device(ONLINE[0]["enterprise"], ONLINE[0]["device_id"])
        assert dev is not None and dev["online"] is False
    finally:
        reader.close()
        writer.close()


def test_answers_over_the_published_view_stay_while_the_next_is_answered_ahead() -> None:
    index = DeviceIndex()
    views = [IndexView(index, generation, None) for generation in (1, 2, 3)]
    cache = AnswerCache(Counter())
    asked: list[int] = []

    def again(view: IndexView) -> str:
        asked.append(view.generation)
        return f"over {view.generation}"

    cache.put("city", 1, "over 1", again)
    assert cache.warm(views[1], since=0.0) == 1 and asked == [2]
    # Queries still counting over view 1 are lookups until view 2 is published.
    assert (cache.get("city", 1), cache.get("city", 2)) == ("over 1", "over 2")
    cache.warm(views[2], since=0.0)
    assert (cache.get("city", 1), cache.get("city", 3)) == (None, "over 3")
    # A query not asked since the last publication is not answered ahead.
    assert cache.warm(views[2], since=time.monotonic() + 1) == 0

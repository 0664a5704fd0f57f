"""The data-quality gate over instances sharing PostgreSQL: each instance receives part of
every device's samples (as a shared subscription hands them out), and every instance must
judge all of them, before and after one of them restarts."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.ratios import compute_ratios
from gateway.registry import Registry, parse_ledger
from gateway.registry.shared_quality import _FOLD_SLICE
from gateway.sink import SampleSummary
from iiot_common.localservers import PostgreSQL
from protocols.mqtt.contract import Birth, BirthDevice
from tests.waiting import wait_until

T0 = 1_750_000_000_000
MINUTE = 60_000
HOUR = 60 * MINUTE
ENT, AGENT = "q-ent", "q-agent"
# Polled every 60 s and watched for the last hour: 60 samples expected, 48 pass (0.8).
KINDS = {
    "split": "every minute, values moving: passes only with every instance's samples",
    "frozen": "every minute, one value all along: frozen wherever it is judged",
    "sparse": "every second minute: too few samples however they are counted",
    "apart": "every minute; each instance alone sees one value, together they differ",
}


class _Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


def _instance(url: str, clock: _Clock) -> Registry:
    reg = Registry(url, default_poll_interval=60, persist_granularity=0.001, clock=clock)
    assert reg.quality_loaded(30), "the shared buckets were not read within 30 s"
    return reg


@pytest.fixture
def cluster(postgres_server: PostgreSQL) -> Iterator[tuple[str, _Clock, list[Registry]]]:
    url = postgres_server.create_database()
    clock = _Clock(T0 - HOUR)
    first = _instance(url, clock)
    first.add_enterprise(ENT, "Quality Works", "130102", "C30")
    first.add_agent(ENT, AGENT, None)
    csv = "device_id,enterprise,family\n" + "".join(f"{d},{ENT},kiln\n" for d in KINDS)
    rows, errors = parse_ledger(csv.encode(), "text/csv")
    assert errors == []
    first.import_devices(rows)
    instances = [first, _instance(url, clock), _instance(url, clock)]
    birth = Birth(
        bdseq=1,
        ts=T0 - HOUR,
        devices=[BirthDevice(id=d, profile="p", protocol="modbus") for d in KINDS],
    )
    for reg in instances:
        _ = reg.quality  # each watches from T0 - 1 h
        reg.on_birth(ENT, AGENT, birth)
    yield url, clock, instances
    for reg in instances:
        reg.close()


def _value(kind: str, minute: int, receiver: int) -> float:
    if kind == "frozen":
        return 1.0
    if kind == "apart":
        return float(receiver)
    return float(minute)


def _send(instances: list[Registry], clock: _Clock, minutes: range) -> None:
    """Each minute's message of every device reaches one instance, in turn."""
    for m in minutes:
        ts = T0 - HOUR + m * MINUTE + 500
        clock.ms = ts
        for kind in KINDS:
            if kind == "sparse" and m % 2:
                continue
            k = m % len(instances)
            summary = SampleSummary(
                ENT,
                AGENT,
                kind,
                count=1,
                first_ts=ts,
                last_ts=ts,
                last_good_ts=ts,
                latest={"v": _value(kind, m, k)},
            )
            instances[k].on_samples(summary)


def _sync(instances: list[Registry]) -> None:
    """Every instance writes what it counted, then every instance reads the others' device
    rows and quality counts (as its refresh and sharing threads do)."""
    for reg in instances:
        reg.flush()
        reg.share_quality()
    for reg in instances:
        reg.refresh()
        reg.fold_quality()


def _verdicts(reg: Registry, as_of: int) -> dict[str, Any]:
    judged = {kind: reg.quality.judge((ENT, kind), as_of, 24 * HOUR) for kind in KINDS}
    overall = compute_ratios(reg, None, as_of_ms=as_of)["overall"]
    return {"quality_connected": overall["quality_connected"], "devices": judged}


def test_every_instance_judges_every_instances_samples_and_a_restart_keeps_them(
    cluster: tuple[str, _Clock, list[Registry]],
) -> None:
    url, clock, instances = cluster
    _send(instances, clock, range(60))
    clock.ms = T0
    # Alone, an instance has a third of each device's samples: nothing passes.
    alone = instances[0].quality.judge((ENT, "split"), T0, 24 * HOUR)
    assert (alone["samples"], alone["expected"], alone["passes"]) == (20, 60, False)
    assert instances[0].quality.judge((ENT, "apart"), T0, 24 * HOUR)["frozen"] is True

    _sync(instances)
    answers = [_verdicts(reg, T0) for reg in instances]
    assert answers[0] == answers[1] == answers[2]
    devices = answers[0]["devices"]
    assert {k for k, v in devices.items() if v["passes"]} == {"split", "apart"}
    assert answers[0]["quality_connected"] == 2
    assert (devices["split"]["samples"], devices["split"]["expected"]) == (60, 60)
    assert devices["frozen"]["frozen"] is True and devices["frozen"]["samples"] == 60
    assert devices["sparse"]["samples"] == 30 and devices["sparse"]["complete"] is False

    # One instance restarts; the others keep counting meanwhile. The restarted one
    # starts with the shared buckets and the others' watched span, not an empty window.
    instances[2].close()
    instances[2] = _instance(url, clock)
    _send(instances, clock, range(60, 70))
    clock.ms = as_of = T0 + 10 * MINUTE
    _sync(instances)
    answers = [_verdicts(reg, as_of) for reg in instances]
    assert answers[0] == answers[1] == answers[2]
    split = answers[2]["devices"]["split"]
    assert (split["samples"], split["expected"], split["passes"]) == (70, 70, True)
    assert answers[2]["devices"]["frozen"]["frozen"] is True
    assert answers[2]["quality_connected"] == 2


def test_old_buckets_are_deleted_and_a_break_in_counting_restarts_the_watched_span(
    cluster: tuple[str, _Clock, list[Registry]],
) -> None:
    url, clock, instances = cluster
    _send(instances, clock, range(60))
    clock.ms = T0
    # A message from two days ago: its bucket is written, then deleted as too old.
    ts = T0 - 48 * HOUR
    old = SampleSummary(
        ENT, AGENT, "split", count=1, first_ts=ts, last_ts=ts, last_good_ts=ts, latest={}
    )
    instances[0].on_samples(old)
    _sync(instances)
    with instances[0].engine.connect() as conn:
        starts = conn.execute(sa.text("SELECT min(start_ms), count(*) FROM quality_buckets")).one()
    assert starts[0] >= T0 - 25 * HOUR and starts[1] > 0
    since = instances[0].quality.watched_ms
    assert since == T0 - HOUR

    # Every instance stops, and none counts for an hour: whoever starts then watches
    # from its own start, and says so to the next.
    for reg in instances:
        reg.close()
    clock.ms = T0 + HOUR
    instances[:] = [_instance(url, clock)]
    assert instances[0].quality.watched_ms == T0 + HOUR
    instances[0].share_quality()
    later = _instance(url, clock)
    instances.append(later)
    assert later.quality.watched_ms == T0 + HOUR


def test_on_sqlite_the_window_is_this_instances_alone(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    clock = _Clock(T0 - HOUR)
    first = _instance(url, clock)
    first.add_enterprise(ENT, "Quality Works", "130102", "C30")
    first.add_agent(ENT, AGENT, None)
    rows, _errors = parse_ledger(
        f"device_id,enterprise,family\nsplit,{ENT},kiln\n".encode(), "text/csv"
    )
    first.import_devices(rows)
    _send([first], clock, range(60))
    assert not first.quality_shared and first.share_quality() == 0
    first.close()
    again = _instance(url, clock)
    try:
        judged = again.quality.judge((ENT, "split"), clock.ms, 24 * HOUR)
        assert judged["samples"] == 0 and again.quality.watched_ms == clock.ms
    finally:
        again.close()


def test_any_device_id_reaches_the_other_instances(postgres_server: PostgreSQL) -> None:
    url = postgres_server.create_database()
    clock = _Clock(T0)
    one, two = _instance(url, clock), _instance(url, clock)
    try:
        odd = 'pump "7" \\ west,{a}'
        summary = SampleSummary(
            ENT, AGENT, odd, count=3, first_ts=T0, last_ts=T0, last_good_ts=T0, latest={"v": 1}
        )
        _ = two.quality
        one.quality.record(summary)
        assert one.share_quality() == 1
        assert two.fold_quality() == 1
        assert two.quality.judge((ENT, odd), T0 + 1000, HOUR)["samples"] == 3
    finally:
        one.close()
        two.close()


def test_a_failed_write_keeps_its_counts_for_the_next(postgres_server: PostgreSQL) -> None:
    url = postgres_server.create_database()
    clock = _Clock(T0)
    one = _instance(url, clock)
    try:
        summary = SampleSummary(
            ENT, AGENT, "split", count=3, first_ts=T0, last_ts=T0, last_good_ts=T0, latest={"v": 1}
        )
        one.quality.record(summary)
        # The database refuses the write (the table is away, as in a failover's window).
        with one.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE quality_buckets RENAME TO quality_buckets_away")
        assert one.share_quality() == 0
        assert one.counters["quality_share_errors"] == 1
        with one.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE quality_buckets_away RENAME TO quality_buckets")
        assert one.share_quality() == 1
        with one.engine.connect() as conn:
            samples = conn.execute(sa.text("SELECT samples FROM quality_buckets")).scalar_one()
        assert samples == 3
    finally:
        one.close()


def test_without_a_shared_subscription_each_instance_keeps_its_own_counts(
    postgres_server: PostgreSQL,
) -> None:
    # Every instance receives every message: adding them up would count each sample
    # once per instance.
    url = postgres_server.create_database()
    reg = Registry(url, default_poll_interval=60, share_quality=False, clock=_Clock(T0))
    try:
        summary = SampleSummary(
            ENT, AGENT, "split", count=3, first_ts=T0, last_ts=T0, last_good_ts=T0, latest={"v": 1}
        )
        reg.quality.record(summary)
        assert not reg.quality_shared and reg.share_quality() == 0
        with reg.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT count(*) FROM quality_buckets")).scalar_one()
        assert rows == 0
    finally:
        reg.close()


def test_a_refresh_pass_never_waits_for_the_others_quality_counts(
    cluster: tuple[str, _Clock, list[Registry]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another instance writes counts for many devices and a device's first sample; this
    # one folds the counts on its sharing thread, held after its first slice. Meanwhile
    # its refresh pass shows the device connected, and ingest records: neither waits.
    url, clock, instances = cluster
    writer = instances[0]
    reader = Registry(url, default_poll_interval=60, quality_share_interval=0.2, clock=clock)
    assert reader.quality_loaded(30), "the shared buckets were not read within 30 s"
    window = reader.quality
    fold = window.fold
    held, release = threading.Event(), threading.Event()
    slices: list[tuple[str, int]] = []

    def _held_fold(rows: Sequence[tuple[Any, ...]]) -> int:
        taken = fold(rows)
        slices.append((threading.current_thread().name, len(rows)))
        held.set()
        release.wait(60)  # the window's lock is free here
        return taken

    monkeypatch.setattr(window, "fold", _held_fold)
    many = 2 * _FOLD_SLICE + 5_000
    keys = [(f"m-{k // 50:05d}", f"d{k % 50:02d}") for k in range(many)]
    try:
        reader.start()
        for ent, dev in keys:
            writer.quality.record(_summary(ent, dev, clock.ms, 2))
        assert writer.share_quality() == many
        writer.on_samples(_summary(ENT, "split", clock.ms, 1))
        writer.flush()
        assert held.wait(30), "the sharing thread folded nothing within 30 s"

        assert compute_ratios(reader, None, as_of_ms=clock.ms)["overall"]["connected"] == 0
        refresher = threading.Thread(target=reader.refresh)
        refresher.start()
        refresher.join(30)
        assert not refresher.is_alive(), "the refresh pass waited for the fold"
        overall = compute_ratios(reader, None, as_of_ms=clock.ms)["overall"]
        assert overall["connected"] == 1
        # Ingest is not held up either, and the fold is a slice in.
        recorder = threading.Thread(
            target=window.record, args=(_summary(ENT, "frozen", clock.ms, 1),)
        )
        recorder.start()
        recorder.join(30)
        assert not recorder.is_alive(), "ingest waited for the fold"
        assert slices == [("quality-share", _FOLD_SLICE)]
        assert _folded(reader, keys, clock.ms) == _FOLD_SLICE

        release.set()
        wait_until(lambda: _folded(reader, keys, clock.ms) == many, 30, "every count folded", 0.2)
        assert {name for name, _n in slices} == {"quality-share"}
        assert max(n for _name, n in slices) <= _FOLD_SLICE
        assert window.judge(keys[-1], clock.ms + 1000, HOUR)["samples"] == 2
    finally:
        release.set()
        reader.close()


def _summary(ent: str, dev: str, ts: int, count: int) -> SampleSummary:
    return SampleSummary(
        ent, AGENT, dev, count=count, first_ts=ts, last_ts=ts, last_good_ts=ts, latest={"v": 1}
    )


def _folded(reg: Registry, keys: list[tuple[str, str]], ts: int) -> int:
    """Of ``keys``, the devices with samples in the registry's window."""
    return sum(1 for key in keys if reg.quality.judge(key, ts + 1000, HOUR)["samples"] > 0)

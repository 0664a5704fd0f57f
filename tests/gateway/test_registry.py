"""Registry: ingest events, persistence, ledger parsing and idempotent imports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.ratios import compute_ratios
from gateway.registry import LedgerError, Registry, parse_ledger
from gateway.sink import SampleSummary
from protocols.mqtt.contract import Birth, BirthDevice, DeviceState, Will
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_registry_fixtures import POLL_S, T0, agent_of

# Fixtures shared with the other registry/API tests; these run on SQLite and PostgreSQL.
registry_url = _fx.both_registry_urls
registry = _fx.registry
hebei = _fx.hebei


def test_state_survives_a_restart(tmp_path: Path, registry_url: str) -> None:
    url = registry_url
    from tests.gateway.test_registry_fixtures import populate

    with Registry(url, default_poll_interval=POLL_S) as reg:
        populate(reg)
        before = compute_ratios(reg, "county", window_s=86400, as_of_ms=T0)
    with Registry(url, default_poll_interval=POLL_S) as again:
        after = compute_ratios(again, "county", window_s=86400, as_of_ms=T0)
        dev = again.get_device("hb-cement", "dev-00")
    # Connected/total come back from the database; online needs live agents again.
    assert [(g["key"], g["total"], g["connected"]) for g in after["groups"]] == [
        (g["key"], g["total"], g["connected"]) for g in before["groups"]
    ]
    assert dev is not None and dev["status"] == "connected" and dev["agent"] == "agent-hb-cement"


def test_frequent_samples_are_written_coarsely_and_exactly_at_close(
    tmp_path: Path, registry_url: str
) -> None:
    url = registry_url
    reg = Registry(url, default_poll_interval=POLL_S, clock=lambda: T0 / 1000)
    reg.add_enterprise("e", "E", "130102", "C30")
    reg.add_agent("e", "a", None)
    rows, _ = parse_ledger(b"device_id,enterprise,family\nd1,e,kiln\n", "text/csv")
    reg.import_devices(rows)

    def sample(ts: int) -> None:
        reg.on_samples(
            SampleSummary(
                "e", "a", "d1", count=1, first_ts=ts, last_ts=ts, last_good_ts=ts, latest={}
            )
        )

    sample(T0)
    assert reg.flush() == 1  # first good sample: status 'connected' is written at once
    for k in range(1, 6):
        sample(T0 + k * 10_000)
    assert reg.flush() == 0  # 50 s of polls: nothing worth a write yet
    sample(T0 + 60_000)
    assert reg.flush() == 1
    sample(T0 + 70_000)
    reg.close()
    with Registry(url, default_poll_interval=POLL_S) as again:
        dev = again.get_device("e", "d1")
    assert dev is not None and dev["last_good_ms"] == T0 + 70_000


def test_publisher_checks(hebei: Registry) -> None:
    assert hebei.check_publisher("hb-steel", "agent-hb-steel") is None
    assert hebei.check_publisher("nobody", "agent-hb-steel") == "unknown_enterprise"
    assert hebei.check_publisher("hb-steel", "ghost") == "unknown_agent"
    assert hebei.check_publisher("hb-steel", "agent-hb-cement") == "agent_enterprise_mismatch"
    assert hebei.device_tags("hb-steel", "dev-01") == ("boiler", "generic")
    assert hebei.device_tags("hb-steel", "dev-45") is None  # dev-45 is hb-cement's


def test_birth_adds_unledgered_device_with_enterprise_codes(hebei: Registry) -> None:
    hebei.on_birth(
        "hb-power",
        agent_of("hb-power"),
        Birth(
            bdseq=2,
            ts=T0,
            devices=[
                BirthDevice(
                    id="genset-x", profile="genset-1", protocol="modbus", family="diesel_genset"
                )
            ],
        ),
    )
    dev = hebei.get_device("hb-power", "genset-x")
    assert dev is not None
    assert dev["not_in_ledger"] is True and dev["source"] == "agent"
    assert (dev["region"], dev["industry"]) == ("130682", "D44")
    assert dev["category"] == "general_power" and dev["status"] == "provisioned"
    total, items = hebei.list_devices(not_in_ledger=True)
    assert total == 1 and items[0]["id"] == "genset-x"
    # A later ledger import claims it: no longer flagged.
    rows, _ = parse_ledger(
        b"device_id,enterprise,family\ngenset-x,hb-power,diesel_genset\n", "text/csv"
    )
    assert hebei.import_devices(rows).updated == 1
    dev = hebei.get_device("hb-power", "genset-x")
    assert dev is not None and dev["not_in_ledger"] is False


def test_a_stale_will_does_not_take_a_reborn_agent_offline(hebei: Registry) -> None:
    agent = agent_of("hb-steel")
    hebei.on_birth("hb-steel", agent, Birth(bdseq=7, ts=T0, devices=[]))
    hebei.on_will("hb-steel", agent, Will(bdseq=6))
    assert next(a for a in hebei.list_agents("hb-steel")).online is True
    hebei.on_will("hb-steel", agent, Will(bdseq=7))
    assert next(a for a in hebei.list_agents("hb-steel")).online is False


def test_latest_values_and_recent_offline(hebei: Registry) -> None:
    dev = hebei.get_device("hb-steel", "dev-06")
    assert dev is not None and dev["latest"] == {"temperature": 26.0}
    assert dev["last_good_ms"] == T0 - 5_000
    hebei.on_samples(
        SampleSummary(
            "hb-steel",
            agent_of("hb-steel"),
            "dev-06",
            count=1,
            first_ts=T0,
            last_ts=T0,
            last_good_ts=T0,
            latest={"pressure": 1.5},
        )
    )
    dev = hebei.get_device("hb-steel", "dev-06")
    assert dev is not None and dev["latest"] == {"temperature": 26.0, "pressure": 1.5}
    hebei.on_device_state(
        "hb-steel",
        agent_of("hb-steel"),
        "dev-06",
        DeviceState(online=False, ts=T0 + 1, reason="timeout"),
    )
    dropped = hebei.recent_offline(limit=5)
    assert dropped[0]["id"] == "dev-06" and dropped[0]["state_reason"] == "timeout"
    assert dropped[0]["offline_since_ms"] == T0 + 1


def test_unknown_devices_are_counted_not_fatal(hebei: Registry) -> None:
    hebei.on_samples(
        SampleSummary(
            "hb-steel",
            "agent-hb-steel",
            "nope",
            count=1,
            first_ts=T0,
            last_ts=T0,
            last_good_ts=T0,
            latest={},
        )
    )
    hebei.on_device_state("hb-steel", "agent-hb-steel", "nope", DeviceState(online=True, ts=T0))
    assert hebei.counters["unknown_device"] == 2


def test_list_devices_filters_and_pages(hebei: Registry) -> None:
    total, items = hebei.list_devices(region="1301", limit=5, offset=0)
    assert total == 20 and len(items) == 5
    total2, items2 = hebei.list_devices(region="1301", limit=5, offset=18)
    assert total2 == 20 and len(items2) == 2
    total, _ = hebei.list_devices(category="new_energy", enterprise="hb-steel")
    assert total == sum(1 for k in range(50) if k % 5 == 1 and k % 8 in (4, 5))
    total, _ = hebei.list_devices(status="registered")
    assert total == 20  # the 20 devices that never reported


CSV_WITH_BAD_ROWS = (
    b"device_id,enterprise,region,industry,family,category,name\n"
    b"ok-1,hb-steel,130203,C31,boiler,high_energy_process,Boiler 1\n"
    b"ok-2,hb-steel,,,motor,,Motor 2\n"
    b"bad id!,hb-steel,130203,C31,boiler,high_energy_process,x\n"
    b"ok-3,hb-steel,999999,C31,boiler,high_energy_process,x\n"
    b"ok-4,hb-steel,130203,C31,boiler,space_equipment,x\n"
    b"ok-5,hb-steel,13020,C31,boiler,high_energy_process,x\n"
    b"ok-6,hb-steel,130203,C99,boiler,high_energy_process,x\n"
    b"ok-7,ghost,130203,C31,boiler,high_energy_process,x\n"
)


def test_ledger_csv_reports_each_bad_row(hebei: Registry) -> None:
    rows, errors = parse_ledger(CSV_WITH_BAD_ROWS, "text/csv")
    result = hebei.import_devices(rows)
    assert result.accepted == 2 and result.created == 2
    problems = {e.line: e.reason for e in errors + result.errors}
    assert sorted(problems) == [4, 5, 6, 7, 8, 9]
    assert "device_id" in problems[4]
    assert "province" in problems[5]
    assert "unknown category 'space_equipment'" in problems[6]
    assert "six-digit" in problems[7]
    assert "division 99" in problems[8]
    assert "unknown enterprise 'ghost'" in problems[9]
    dev = hebei.get_device("hb-steel", "ok-2")
    assert dev is not None and dev["category"] == "general_power" and dev["region"] == "130203"
    again = hebei.import_devices(parse_ledger(CSV_WITH_BAD_ROWS, "text/csv")[0])
    assert (again.created, again.updated) == (0, 2)
    assert hebei.list_devices(enterprise="hb-steel")[0] == 12


def test_ledger_json_reports_each_bad_item(hebei: Registry) -> None:
    body = json.dumps(
        [
            {"device_id": "j-1", "enterprise": "hb-chem", "family": "boiler"},
            {"device_id": "j-2", "enterprise": "hb-chem", "category": "nope", "family": "kiln"},
            "not an object",
            {"device_id": "j-3", "enterprise": "hb-chem", "colour": "red"},
        ]
    ).encode()
    rows, errors = parse_ledger(body, "application/json")
    assert [r.device_id for _, r in rows] == ["j-1"]
    assert [(e.line, e.device_id) for e in errors] == [(2, "j-2"), (3, None), (4, "j-3")]
    assert "colour" in errors[2].reason


def test_unusable_ledgers_are_refused_with_a_reason() -> None:
    cases = [
        (b"", "text/csv", "empty"),
        (b"enterprise,region\nx,130102\n", "text/csv", "device_id"),
        (b"device_id,enterprise,colour\n", "text/csv", "colour"),
        (b"{}", "application/json", "list"),
        (b"[", "application/json", "JSON"),
        (b"\xff\xfe", "text/csv", "UTF-8"),
        (b"a", "application/xml", "content type"),
    ]
    for body, ctype, word in cases:
        try:
            parse_ledger(body, ctype)
        except LedgerError as exc:
            assert word in str(exc), (body, str(exc))
        else:
            raise AssertionError(f"{body!r} was accepted")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["text/csv", "application/json"]))
def test_ledger_parser_never_crashes_on_bytes(body: bytes, ctype: str) -> None:
    try:
        rows, errors = parse_ledger(body, ctype)
    except LedgerError:
        return
    assert all(e.line >= 1 and e.reason for e in errors)
    assert all(line >= 1 for line, _ in rows)


_cell = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_cell, _cell, _cell, _cell), max_size=8))
def test_ledger_rows_are_accepted_or_explained(cells: list[tuple[str, str, str, str]]) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["device_id", "enterprise", "region", "family"])
    w.writerows(cells)
    rows, errors = parse_ledger(buf.getvalue().encode(), "text/csv")
    for _line, row in rows:
        assert row.device_id and row.enterprise and row.category
    for e in errors:
        assert e.reason


def test_ingest_thread_and_readers_run_concurrently(hebei: Registry) -> None:
    # The MQTT thread adds devices (growing the index) while the API computes ratios
    # and the flush thread writes; every reader sees a consistent population.
    import threading

    errors: list[BaseException] = []

    def ingest() -> None:
        try:
            for k in range(300):
                dev = f"new-{k:03d}"
                hebei.on_birth(
                    "hb-steel",
                    agent_of("hb-steel"),
                    Birth(
                        bdseq=2,
                        ts=T0,
                        devices=[BirthDevice(id=dev, profile="p", protocol="modbus")],
                    ),
                )
                hebei.on_samples(
                    SampleSummary(
                        "hb-steel",
                        agent_of("hb-steel"),
                        dev,
                        count=1,
                        first_ts=T0,
                        last_ts=T0,
                        last_good_ts=T0,
                        latest={"v": k},
                    )
                )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=ingest)
    worker.start()
    seen = []
    while worker.is_alive():
        r = compute_ratios(hebei, "city", window_s=86400, as_of_ms=T0)
        assert sum(g["total"] for g in r["groups"]) == r["overall"]["total"]
        seen.append(r["overall"]["total"])
        hebei.flush()
    worker.join()
    assert errors == []
    assert seen == sorted(seen)  # the population only grows
    final = compute_ratios(hebei, None, window_s=86400, as_of_ms=T0)["overall"]
    assert final["total"] == 350 and final["connected"] == 25 + 300


def _birth_of(device: str) -> Birth:
    return Birth(bdseq=1, ts=T0, devices=[BirthDevice(id=device, profile="p", protocol="modbus")])


def test_a_birth_while_a_ledger_import_writes_its_rows_counts_the_device_once(
    tmp_path: Path, registry_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The import writes its new rows without the memory lock; an agent announcing one of
    # those devices in that moment must not give it a second position (counted twice, and
    # a duplicate INSERT failing every later flush).
    from gateway.registry import rows as registry_rows

    url = registry_url
    reg = Registry(url, default_poll_interval=POLL_S, clock=lambda: T0 / 1000)
    reg.add_enterprise("e", "E", "130102", "C30")
    reg.add_agent("e", "a", None)
    real_insert = registry_rows.insert_many
    births: list[str] = []

    def insert_then_birth(conn: Any, table: Any, rows: list[dict[str, Any]]) -> None:
        real_insert(conn, table, rows)
        if rows and not births:
            births.append(rows[-1]["id"])
            reg.on_birth("e", "a", _birth_of(rows[-1]["id"]))

    monkeypatch.setattr(registry_rows, "insert_many", insert_then_birth)
    rows, _ = parse_ledger(b"device_id,enterprise,family\nd1,e,kiln\nd2,e,kiln\n", "text/csv")
    result = reg.import_devices(rows)
    assert births == ["d2"]
    assert (result.accepted, result.created, result.updated) == (2, 1, 1)
    assert reg.stats()["devices"] == 2
    assert reg.list_devices(enterprise="e")[0] == 2
    assert compute_ratios(reg, None, window_s=86400, as_of_ms=T0)["overall"]["total"] == 2

    more, _ = parse_ledger(b"device_id,enterprise,family\nd3,e,boiler\n", "text/csv")
    births.clear()
    assert reg.bulk_load([r for _, r in more]) == 1
    assert births == ["d3"] and reg.stats()["devices"] == 3

    assert reg.flush() > 0
    assert reg.counters["flush_errors"] == 0 and reg.stats()["pending_rows"] == 0
    reg.close()
    with Registry(url, default_poll_interval=POLL_S) as again:
        assert again.stats()["devices"] == 3
        d2 = again.get_device("e", "d2")
        assert d2 is not None and d2["status"] == "provisioned" and d2["agent"] == "a"
        assert d2["not_in_ledger"] is False and d2["family"] == "kiln"


def test_an_instance_sharing_the_database_refreshes_to_the_same_ratios(registry_url: str) -> None:
    from tests.gateway.test_registry_fixtures import populate

    # B starts on the empty database; everything then happens at A, as when A ingests.
    a = Registry(registry_url, default_poll_interval=POLL_S, persist_granularity=0.001)
    b = Registry(registry_url, default_poll_interval=POLL_S, refresh_interval=60.0)
    try:
        populate(a)
        a.flush()
        b.refresh()
        for group_by in (None, "county", "enterprise"):
            want = compute_ratios(a, group_by, window_s=86400, as_of_ms=T0)
            assert compute_ratios(b, group_by, window_s=86400, as_of_ms=T0) == want
        # A will ingested at A takes the agent's devices offline at B too.
        before = compute_ratios(a, None, window_s=86400, as_of_ms=T0)["overall"]["online"]
        a.on_will("hb-cement", agent_of("hb-cement"), Will(bdseq=1))
        a.flush()
        assert b.refresh() > 0
        after = compute_ratios(b, None, window_s=86400, as_of_ms=T0)["overall"]
        assert after == compute_ratios(a, None, window_s=86400, as_of_ms=T0)["overall"]
        assert after["online"] < before
        dev = b.get_device("hb-cement", "dev-00")
        assert dev is not None and dev["online"] is False and dev["status"] == "connected"
    finally:
        a.close()
        b.close()

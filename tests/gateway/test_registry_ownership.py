"""The registry keeps a device with its agent: other agents' births, states and samples
change nothing; the ledger, a configuration and decommissioning move it, audited."""

from __future__ import annotations

from gateway.registry import Registry, parse_ledger
from gateway.sink import SampleSummary
from iiot_common.localservers import PostgreSQL
from protocols.mqtt.contract import Birth, BirthDevice, DeviceState
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_registry_fixtures import T0

registry_url = _fx.both_registry_urls
registry = _fx.registry


def _birth(agent: str, *devices: str) -> Birth:
    return Birth(
        bdseq=1,
        ts=T0,
        devices=[BirthDevice(id=d, profile="generic-kiln", protocol="modbus") for d in devices],
    )


def _summary(agent: str, device: str, ts: int, v: float) -> SampleSummary:
    return SampleSummary(
        "e", agent, device, count=1, first_ts=ts, last_ts=ts, last_good_ts=ts, latest={"v": v}
    )


def test_other_agents_change_nothing_and_moves_are_audited(
    registry: Registry, registry_url: str
) -> None:
    reg = registry
    reg.add_enterprise("e", "E", "130102", "C30")
    for a in ("a", "b", "c"):
        reg.add_agent("e", a, None)
    reg.on_birth("e", "a", _birth("a", "d1", "d2"))
    reg.on_device_state("e", "a", "d1", DeviceState(online=True, ts=T0))
    reg.on_samples_many([_summary("a", "d1", T0, 1.0), _summary("a", "d2", T0, 2.0)])
    # Another agent's birth, state and samples for a's devices: nothing changes.
    reg.on_birth("e", "b", _birth("b", "d1", "d3"))
    reg.on_device_state("e", "b", "d1", DeviceState(online=False, ts=T0 + 1, reason="x"))
    reg.on_samples_many([_summary("b", "d1", T0 + 2, 666.0), _summary("b", "d3", T0, 3.0)])
    d1 = reg.get_device("e", "d1")
    assert d1 is not None
    assert (d1["agent"], d1["latest"], d1["state_reason"]) == ("a", {"v": 1.0}, "")
    assert d1["last_seen_ms"] == T0
    assert reg.device_owner("e", "d3") == "b"
    assert reg.counters["foreign_device_births"] == 1
    assert reg.counters["foreign_device_states"] == 1
    assert reg.counters["foreign_samples"] == 1

    # A ledger row naming another agent moves the device; one naming none keeps it.
    rows, _ = parse_ledger(
        b"device_id,enterprise,family,agent\nd1,e,kiln,c\nd2,e,kiln,\n", "text/csv"
    )
    assert not reg.import_devices(rows).errors
    assert (reg.device_owner("e", "d1"), reg.device_owner("e", "d2")) == ("c", "a")
    # The remote configuration of c drops d1 and lists d2 (a's): d1 is free, d2 stays a's.
    assert reg.config_owners("e", "c", ["d2"], ["d1"], by="admin t") == 1
    assert (reg.device_owner("e", "d1"), reg.device_owner("e", "d2")) == (None, "a")
    reg.on_birth("e", "b", _birth("b", "d1"))
    assert reg.device_owner("e", "d1") == "b"
    reg.decommission("e", "d1", by="admin t")
    assert reg.device_owner("e", "d1") is None
    moves = [(m["from_agent"], m["to_agent"], m["via"]) for m in reg.list_moves("e", "d1")]
    assert moves == [("b", None, "decommission"), ("c", None, "config"), ("a", "c", "ledger")]
    reg.flush()
    with Registry(registry_url) as again:
        assert again.device_owner("e", "d1") is None
        assert again.device_owner("e", "d2") == "a"
        assert again.device_owner("e", "d3") == "b"


def test_a_ledger_row_naming_an_agent_that_is_not_the_enterprise_s_is_refused(
    registry: Registry,
) -> None:
    reg = registry
    reg.add_enterprise("e", "E", "130102", "C30")
    reg.add_enterprise("f", "F", "130102", "C30")
    reg.add_agent("e", "a", None)
    reg.add_agent("f", "fa", None)
    ledger = "device_id,enterprise,family,agent\nd1,e,kiln,agnet-typo\nd2,e,kiln,fa\nd3,e,kiln,a\n"
    rows, errors = parse_ledger(ledger.encode(), "text/csv")
    assert not errors
    result = reg.import_devices(rows)
    assert result.created == 1
    assert [(e.line, e.reason) for e in result.errors] == [
        (2, "agent 'agnet-typo' is not registered for enterprise 'e'"),
        (3, "agent 'fa' is not registered for enterprise 'e'"),
    ]
    assert reg.device_owner("e", "d3") == "a"
    assert reg.get_device("e", "d1") is None


def test_another_agent_s_samples_stay_out_of_the_quality_gate(registry: Registry) -> None:
    reg = registry
    reg.add_enterprise("e", "E", "130102", "C30")
    for a in ("a", "b"):
        reg.add_agent("e", a, None)
    reg.on_birth("e", "a", _birth("a", "d1"))
    reg.on_samples(_summary("a", "d1", T0, 1.0))
    reg.on_samples_many([_summary("b", "d1", T0 + 1000, 666.0)])
    reg.on_samples(_summary("b", "d1", T0 + 2000, 667.0))
    kept = reg.quality.telemetry(("e", "d1"), 0)
    assert [m["values"] for m in kept] == [{"v": 1.0}]


def test_an_instance_that_has_not_read_a_move_does_not_take_it_back(
    postgres_server: PostgreSQL,
) -> None:
    url = postgres_server.create_database()
    one = Registry(url, default_poll_interval=60, persist_granularity=0.001)
    two = Registry(url, default_poll_interval=60, persist_granularity=0.001)
    try:
        one.add_enterprise("e", "E", "130102", "C30")
        for a in ("a", "b"):
            one.add_agent("e", a, None)
        one.on_birth("e", "a", _birth("a", "d1"))
        one.flush()
        two.refresh()
        assert two.device_owner("e", "d1") == "a"
        two.move_device("e", "d1", "b", by="admin")
        # ``one`` has not refreshed: it still takes a's birth and writes the device.
        one.on_birth("e", "a", _birth("a", "d1"))
        one.flush()
        one.refresh()
        two.refresh()
        assert one.device_owner("e", "d1") == two.device_owner("e", "d1") == "b"
    finally:
        one.close()
        two.close()

"""A birth naming a protocol or family this gateway does not know is kept, not refused."""

from __future__ import annotations

import json

import pytest

from gateway.ingest import MessageProcessor
from gateway.registry import Registry
from protocols.mqtt.contract import Birth, ContractError, Kind, Topic, decode_payload
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_registry_fixtures import T0, agent_of

registry = _fx.registry
hebei = _fx.hebei


class _Tx:
    def first_time(self, dev: str, seq: int, ts: int) -> bool:
        return True

    def add(self, lines: list[str]) -> None:
        raise AssertionError("a birth writes no samples")


def _birth(*devices: dict[str, str]) -> bytes:
    return json.dumps({"online": True, "bdseq": 3, "ts": T0, "devices": list(devices)}).encode()


def test_a_newer_agents_birth_is_recorded_with_what_is_known(hebei: Registry) -> None:
    ent = "hb-power"
    agent = agent_of(ent)
    payload = _birth(
        # A protocol and a family from a newer agent, next to ones this gateway knows.
        {"id": "chiller-9", "profile": "chiller-x", "protocol": "bacnet", "family": "chiller"},
        {"id": "genset-9", "profile": "genset-1", "protocol": "modbus", "family": "diesel_genset"},
    )
    out = MessageProcessor(hebei).handle(_Tx(), str(Topic.agent_topic(ent, agent)), payload)
    assert out.reject is None, out.detail
    assert out.notify is not None
    out.notify(hebei)

    unknown = hebei.get_device(ent, "chiller-9")
    assert unknown is not None
    assert (unknown["family"], unknown["category"]) == ("other", "unknown")
    assert (unknown["profile"], unknown["agent"], unknown["status"]) == (
        "chiller-x",
        agent,
        "provisioned",
    )
    known = hebei.get_device(ent, "genset-9")
    assert known is not None
    assert (known["family"], known["category"]) == ("diesel_genset", "general_power")


def test_a_protocol_name_must_still_be_an_identifier() -> None:
    topic = Topic.agent_topic("ent-1", "agent-1")
    assert topic.kind is Kind.AGENT
    ok = decode_payload(topic, _birth({"id": "d1", "profile": "p", "protocol": "bacnet-ip.v2"}))
    assert isinstance(ok, Birth)
    assert ok.devices[0].protocol == "bacnet-ip.v2"
    with pytest.raises(ContractError, match=r"devices\.0\.protocol") as info:
        decode_payload(topic, _birth({"id": "d1", "profile": "p", "protocol": "bac net"}))
    assert info.value.reason == "bad_payload"

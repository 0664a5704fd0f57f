"""DCMD payloads: datatypes that never wrap or round a value, ids, and the age bound."""

from __future__ import annotations

from typing import Any

import pytest

from protocols.mqtt.contract import ContractError, PointValue
from protocols.mqtt.sparkplug.command import command_datatype, dcmd, read_dcmd
from protocols.mqtt.sparkplug.payload import DataType, Payload

_BORN = {"setpoint": DataType.INT16, "speed": DataType.DOUBLE, "run": DataType.BOOLEAN}
_ALIAS = {7: ("setpoint", DataType.INT16)}


def _resolve(m: Any) -> tuple[str, int] | None:
    if m.HasField("alias") and m.alias in _ALIAS:
        return _ALIAS[m.alias]
    return (m.name, _BORN[m.name]) if m.name in _BORN else None


@pytest.mark.parametrize(
    ("declared", "value", "expected"),
    [
        (DataType.INT16, 1200, DataType.INT16),
        (DataType.INT16, 70_000, DataType.INT64),  # never wrapped into an Int16
        (DataType.INT16, 1.5, DataType.DOUBLE),  # never rounded: the agent refuses it
        (DataType.DOUBLE, 50, DataType.DOUBLE),
        (DataType.DOUBLE, True, DataType.BOOLEAN),  # the agent refuses a bool on a number
        (DataType.BOOLEAN, False, DataType.BOOLEAN),
        (None, "x", DataType.STRING),
    ],
)
def test_a_value_keeps_its_own_type_when_the_profiles_cannot_hold_it(
    declared: DataType | None, value: PointValue, expected: DataType
) -> None:
    assert command_datatype(declared, value) is expected


def test_values_round_trip_and_ids_are_stable_across_redelivery() -> None:
    payload = dcmd([("setpoint", DataType.INT16, 70_000), ("speed", DataType.DOUBLE, 12)], ts=1_000)
    first = read_dcmd("d-1", payload, _resolve, max_age_ms=30_000, now=2_000)
    again = read_dcmd("d-1", payload, _resolve, max_age_ms=30_000, now=3_000)
    assert [(c.point, c.value, c.problem) for c in first] == [
        ("setpoint", 70_000, None),
        ("speed", 12.0, None),
    ]
    assert [c.id for c in first] == [c.id for c in again]
    assert len({c.id for c in first}) == 2
    other = read_dcmd("d-2", payload, _resolve, max_age_ms=30_000, now=2_000)
    assert not {c.id for c in first} & {c.id for c in other}
    assert all(c.expires == 31_000 for c in first)


def test_request_id_expiry_alias_and_refusals() -> None:
    payload = dcmd([("run", DataType.BOOLEAN, True)], ts=1_000, request_id="w-1", expires=5_000)
    (cmd,) = read_dcmd("d", payload, _resolve, max_age_ms=30_000, now=1_500)
    assert (cmd.id, cmd.value, cmd.expires) == ("w-1", True, 5_000)
    # Stamped in the future: bounded from arrival, not from the stamp.
    (future,) = read_dcmd(
        "d", dcmd([("run", None, True)], ts=10**12), _resolve, max_age_ms=1_000, now=5_000
    )
    assert future.expires == 6_000

    msg = Payload()
    msg.timestamp = 1_000
    by_alias = msg.metrics.add()
    by_alias.alias, by_alias.int_value = 7, 0xFFFF  # Int16 -1 as two's complement
    unknown = msg.metrics.add()
    unknown.name, unknown.datatype, unknown.double_value = "nope", DataType.DOUBLE, 1.0
    wrong = msg.metrics.add()
    wrong.name, wrong.datatype, wrong.string_value = "speed", DataType.DOUBLE, "fast"
    cmds = read_dcmd("d", bytes(msg.SerializeToString()), _resolve, max_age_ms=1, now=1_000)
    assert (cmds[0].point, cmds[0].value, cmds[0].problem) == ("setpoint", -1, None)
    assert cmds[1].problem is not None and "never born" in cmds[1].problem
    assert cmds[2].problem is not None and "string_value" in cmds[2].problem

    unstamped = Payload()
    m = unstamped.metrics.add()
    m.name, m.datatype, m.boolean_value = "run", DataType.BOOLEAN, True
    (none,) = read_dcmd("d", bytes(unstamped.SerializeToString()), _resolve, max_age_ms=1)
    assert none.problem == "DCMD without a timestamp"
    with pytest.raises(ContractError):
        read_dcmd("d", b"\xff\xff", _resolve, max_age_ms=1)

"""DCMD: a host's writes to device metrics, built by the gateway and read by the edge node.

A DCMD carries no request id, so each metric's write gets one derived from what makes the
message unique (device, payload timestamp, ``seq``, the metric itself): a redelivered
message derives the same ids and is answered, not written again. A host that wants its
own id (the gateway, to match its audit) puts it in the metric property ``requestId``;
``expires`` (UInt64, ms) shortens the edge node's own bound on a command's age.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from iiot_common.identifier import is_identifier
from protocols.driver import now_ms
from protocols.mqtt.contract import ContractError, PointValue
from protocols.mqtt.sparkplug.payload import (
    DataType,
    Payload,
    fit_datatype,
    get_properties,
    get_value,
    parse_payload,
    set_property,
    set_value,
)

__all__ = [
    "EXPIRES_PROPERTY",
    "REQUEST_ID_PROPERTY",
    "DeviceCommand",
    "command_datatype",
    "dcmd",
    "read_dcmd",
]

REQUEST_ID_PROPERTY = "requestId"
EXPIRES_PROPERTY = "expires"
_INTS = frozenset(
    {
        DataType.INT8,
        DataType.INT16,
        DataType.INT32,
        DataType.INT64,
        DataType.UINT8,
        DataType.UINT16,
        DataType.UINT32,
        DataType.UINT64,
    }
)
_EXACT_DOUBLE = 2**53


@dataclass(frozen=True, slots=True)
class DeviceCommand:
    """One metric of a DCMD: a write of ``value`` to ``point``, or why it cannot be read."""

    id: str
    point: str
    value: PointValue
    ts: int
    expires: int
    problem: str | None = None


def command_datatype(declared: DataType | None, value: PointValue) -> DataType:
    """The datatype a written value travels with: the profile's when it holds it exactly.

    A value the declared type cannot hold (70000 on an Int16, 1.5 on an integer, true on a
    number) keeps its own type, so the edge node refuses it instead of writing a wrapped
    or rounded number.
    """
    if declared is None or declared is DataType.UNKNOWN:
        return fit_datatype(DataType.UNKNOWN, value)
    if isinstance(value, bool) or isinstance(value, str):
        return fit_datatype(declared, value)
    if isinstance(value, int) and declared in (DataType.FLOAT, DataType.DOUBLE):
        if abs(value) <= _EXACT_DOUBLE:
            return fit_datatype(declared, float(value))
        return fit_datatype(DataType.UNKNOWN, value)
    if isinstance(value, float) and declared in _INTS:
        return DataType.DOUBLE
    return fit_datatype(declared, value)


def dcmd(
    writes: Sequence[tuple[str, DataType | None, PointValue]],
    *,
    ts: int | None = None,
    request_id: str | None = None,
    expires: int | None = None,
) -> bytes:
    """A DCMD payload writing each (metric name, declared datatype, value)."""
    msg = Payload()
    msg.timestamp = now_ms() if ts is None else ts
    for name, declared, value in writes:
        m = msg.metrics.add()
        m.name = name
        m.timestamp = msg.timestamp
        dt = command_datatype(declared, value)
        m.datatype = dt
        set_value(m, dt, value)
        if request_id is not None:
            set_property(m, REQUEST_ID_PROPERTY, request_id)
        if expires is not None:
            props = m.properties
            props.keys.append(EXPIRES_PROPERTY)
            pv = props.values.add()
            pv.type = DataType.UINT64
            pv.long_value = expires
    return bytes(msg.SerializeToString())


def _derived_id(device: str, msg: Any, index: int, metric: Any) -> str:
    h = hashlib.sha256()
    seq = int(msg.seq) if msg.HasField("seq") else -1
    h.update(f"{device}\0{msg.timestamp}\0{seq}\0{msg.uuid}\0{index}\0".encode())
    h.update(metric.SerializeToString(deterministic=True))
    return "sp-" + h.hexdigest()[:32]


def read_dcmd(
    device: str,
    payload: bytes,
    resolve: Callable[[Any], tuple[str, int] | None],
    *,
    max_age_ms: int,
    now: int | None = None,
) -> list[DeviceCommand]:
    """The writes a DCMD asks for, each with an id and an expiry; ContractError if unreadable.

    ``resolve`` maps a metric to (point name, born datatype) by alias or name, None if
    unknown. A command expires ``max_age_ms`` after the payload's timestamp (or after it
    arrived, if stamped in the future), or at its ``expires`` property if sooner.
    """
    msg = parse_payload(payload)
    if not msg.metrics:
        raise ContractError("bad_payload", "DCMD without metrics")
    now = now_ms() if now is None else now
    out: list[DeviceCommand] = []
    single = len(msg.metrics) == 1
    for i, m in enumerate(msg.metrics):
        props = get_properties(m) if m.HasField("properties") else {}
        rid = props.get(REQUEST_ID_PROPERTY)
        cmd_id = rid if single and rid is not None and is_identifier(rid) else None
        cmd_id = cmd_id or _derived_id(device, msg, i, m)
        stamped = msg.timestamp or m.timestamp
        expires = min(stamped, now) + max_age_ms
        bound = props.get(EXPIRES_PROPERTY)
        if bound is not None and bound.isdigit():
            expires = min(expires, int(bound))
        name = m.name or f"alias {m.alias}"
        if not stamped:
            out.append(DeviceCommand(cmd_id, name, None, 0, 0, "DCMD without a timestamp"))
            continue
        found = resolve(m)
        if found is None:
            out.append(
                DeviceCommand(cmd_id, name, None, stamped, expires, f"{name} was never born")
            )
            continue
        point, born_dt = found
        try:
            value = get_value(m, m.datatype if m.HasField("datatype") else born_dt)
        except ContractError as exc:
            out.append(DeviceCommand(cmd_id, point, None, stamped, expires, str(exc)))
            continue
        if value is None:
            out.append(DeviceCommand(cmd_id, point, None, stamped, expires, "null value"))
            continue
        out.append(DeviceCommand(cmd_id, point, value, stamped, expires))
    return out

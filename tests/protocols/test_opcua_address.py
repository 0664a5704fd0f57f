"""OPC UA values that real servers send and a JSON uplink cannot carry as they are."""

from __future__ import annotations

import math

import orjson
import pytest

from device_profiles.schema import Point, ValueType
from protocols.opcua.address import decode_value


def _point(t: ValueType) -> Point:
    return Point.model_validate({"name": "p", "type": t, "opcua": {"node_id": "ns=2;s=p"}})


def test_a_legacy_encoded_string_becomes_publishable_text() -> None:
    # A GBK string decoded with surrogate escapes, as asyncua hands it over.
    raw = "回转窑".encode("gbk").decode("utf-8", "surrogateescape")
    value = decode_value(_point(ValueType.STRING), raw)
    assert isinstance(value, str)
    orjson.dumps({"p": value})  # would raise on surrogates


@pytest.mark.parametrize("raw", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_as_garbage(raw: float) -> None:
    with pytest.raises(ValueError, match="not a finite number"):
        decode_value(_point(ValueType.FLOAT64), raw)

"""Whatever arrives on a topic, ingest neither raises nor writes an unparseable line."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.influx import format_fields, series_prefix
from gateway.ingest import MessageProcessor
from tests.gateway.test_ingest import MemorySink

_FLOAT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_INT = re.compile(r"^[+-]?\d+i$")


def _unescaped_until(text: str, i: int, stops: str) -> tuple[str, int]:
    """Read from ``i`` until an unescaped stop character; returns (raw text, index)."""
    out = []
    while i < len(text) and text[i] not in stops:
        if text[i] == "\\" and i + 1 < len(text):
            out.append(text[i : i + 2])
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out), i


def parse_line(line: str) -> tuple[str, dict[str, str], dict[str, str], int]:
    """A strict reader of one line of InfluxDB line protocol (raises AssertionError)."""
    assert line and "\n" not in line
    series, i = _unescaped_until(line, 0, " ")
    assert i < len(line), "no fields"
    parts = []
    rest, _ = series, 0
    j = 0
    while True:
        piece, j = _unescaped_until(rest, j, ",")
        parts.append(piece)
        if j >= len(rest):
            break
        j += 1
    measurement, tag_parts = parts[0], parts[1:]
    assert measurement, "empty measurement"
    tags: dict[str, str] = {}
    for tp in tag_parts:
        k, at = _unescaped_until(tp, 0, "=")
        assert k and at < len(tp), f"bad tag {tp!r}"
        v = tp[at + 1 :]
        assert v and "=" not in v.replace("\\=", ""), f"bad tag value {tp!r}"
        assert not v.endswith("\\") or v.endswith("\\\\")
        tags[k] = v
    i += 1
    fields: dict[str, str] = {}
    while True:
        k, i = _unescaped_until(line, i, "=")
        assert k and i < len(line), "bad field key"
        i += 1
        if line[i] == '"':
            j = i + 1
            while line[j] != '"':
                assert line[j] != "\n"
                j += 2 if line[j] == "\\" else 1
            value = line[i : j + 1]
            i = j + 1
        else:
            value, i = _unescaped_until(line, i, ", ")
            assert _FLOAT.match(value) or _INT.match(value) or value in ("true", "false"), (
                f"bad field value {value!r}"
            )
            if _FLOAT.match(value):
                assert math.isfinite(float(value))
        fields[k] = value
        assert i < len(line), "no timestamp"
        if line[i] == " ":
            break
        assert line[i] == ",", f"junk after field at {i}"
        i += 1
    ts = line[i + 1 :]
    assert re.fullmatch(r"\d+", ts), f"bad timestamp {ts!r}"
    return measurement, tags, fields, int(ts)


class _Tx:
    def __init__(self) -> None:
        self.keys: set[tuple[str, int, int]] = set()
        self.lines: list[str] = []

    def first_time(self, dev: str, seq: int, ts: int) -> bool:
        key = (dev, seq, ts)
        if key in self.keys:
            return False
        self.keys.add(key)
        return True

    def add(self, lines: list[str]) -> None:
        self.lines.extend(lines)


_ident_chars = st.sampled_from(list("abcXYZ09_.-") + list(' /+#,=\\"é\x00\n'))
_ident = st.text(_ident_chars, min_size=0, max_size=8) | st.sampled_from(
    ["ent-1", "agent-1", "kiln-1", "agent-2"]
)
_kind = st.sampled_from(["data", "state", "agent", "cmd", "other", ""])
_topic = (
    st.builds(lambda e, a, d, k: f"iiot/v1/{e}/{a}/{d}/{k}", _ident, _ident, _ident, _kind)
    | st.builds(lambda e, a: f"iiot/v1/{e}/{a}/agent", _ident, _ident)
    | st.text(max_size=40)
)
_scalar = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
_json_value: Any = st.recursive(
    _scalar,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
_point_name = st.text(_ident_chars, min_size=0, max_size=6)
_sample = st.fixed_dictionaries(
    {
        "ts": st.integers(min_value=-5, max_value=2**64) | st.floats() | st.text(max_size=3),
        "values": st.dictionaries(_point_name, _scalar | _json_value, max_size=4),
    },
    optional={"errors": st.dictionaries(_point_name, st.text(max_size=5) | _scalar, max_size=2)},
)
_data = st.fixed_dictionaries(
    {"seq": st.integers(min_value=-3, max_value=2**65), "samples": st.lists(_sample, max_size=3)}
)
_payload = (
    st.binary(max_size=60)
    | _data.map(lambda d: json.dumps(d).encode())
    | _json_value.map(lambda d: json.dumps(d).encode())
    | st.builds(
        lambda online, ts: json.dumps({"online": online, "ts": ts, "bdseq": 1}).encode(),
        st.booleans(),
        st.integers(min_value=-1, max_value=10**15),
    )
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(topic=_topic, payload=_payload)
def test_any_topic_and_payload_is_handled(topic: str, payload: bytes) -> None:
    sink = MemorySink(tags={("ent-1", "kiln-1"): ("kiln", 'we,ird "tag" \\')})
    proc = MessageProcessor(sink)
    tx = _Tx()
    outcome = proc.handle(tx, topic.encode("utf-8", "surrogatepass"), payload)
    if outcome.reject is not None:
        assert outcome.reject and not tx.lines
    if outcome.notify is not None:
        outcome.notify(sink)
    for line in tx.lines:
        measurement, tags, _, ts = parse_line(line)
        assert measurement == "telemetry"
        assert {"enterprise", "agent", "device"} <= set(tags)
        assert ts >= 0


@settings(max_examples=300, deadline=None)
@given(
    tags=st.dictionaries(st.text(min_size=1, max_size=6), st.text(max_size=6), max_size=4),
    values=st.dictionaries(st.text(min_size=1, max_size=6), _scalar, min_size=1, max_size=4),
)
def test_escaping_always_gives_a_parseable_line(
    tags: dict[str, str], values: dict[str, Any]
) -> None:
    fields = format_fields(values)
    if not fields:
        return
    line = f"{series_prefix('m ,x', tags)}{fields} 1"
    measurement, parsed_tags, parsed_fields, _ = parse_line(line)
    assert measurement == "m\\ \\,x"
    assert len(parsed_tags) == sum(1 for v in tags.values() if v)
    assert len(parsed_fields) == sum(1 for v in values.values() if _has_form(v))


def _has_form(v: Any) -> bool:
    if type(v) is float:
        return math.isfinite(v)
    if type(v) is int:
        return abs(v) < 2**1023
    return isinstance(v, bool | str)


_good_name = st.text(st.sampled_from(list("abcXYZ09_.-")), min_size=1, max_size=6)
_good_sample = st.fixed_dictionaries(
    {
        "ts": st.integers(min_value=0, max_value=9_223_372_036_854),
        "values": st.dictionaries(_good_name, _scalar, max_size=5),
    },
    optional={"errors": st.dictionaries(_good_name, st.text(max_size=5), max_size=2)},
)


@settings(max_examples=300, deadline=None)
@given(
    device=st.sampled_from(["kiln-1", "boiler-2"]),
    seq=st.integers(min_value=0, max_value=2**40),
    samples=st.lists(_good_sample, min_size=1, max_size=4),
)
def test_valid_data_gives_one_parseable_line_per_sample_with_values(
    device: str, seq: int, samples: list[dict[str, Any]]
) -> None:
    sink = MemorySink(tags={("ent-1", "kiln-1"): ("kiln", 'we,ird "tag" \\')})
    tx = _Tx()
    payload = json.dumps({"seq": seq, "samples": samples}).encode()
    outcome = MessageProcessor(sink).handle(tx, f"iiot/v1/ent-1/agent-1/{device}/data", payload)
    assert outcome.reject is None, outcome.detail
    expected = []
    for s in samples:
        good = {k: v for k, v in s["values"].items() if k not in s.get("errors", {})}
        if any(_has_form(v) for v in good.values()):
            expected.append({k for k, v in good.items() if _has_form(v)})
    assert len(tx.lines) == len(expected)
    for line, names in zip(tx.lines, expected, strict=True):
        _, tags, fields, ts = parse_line(line)
        assert tags["device"] == device
        assert set(fields) == names  # errored points never become fields
        assert 0 <= ts <= 9_223_372_036_854

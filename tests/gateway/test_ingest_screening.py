"""Ingest under faults and abuse: sequence gaps, non-finite values, point-name floods."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import GatewayConfig, InfluxConfig, IngestConfig, MqttConfig
from gateway.ingest import MessageProcessor, ProfilePoints
from gateway.outbox import Outbox
from gateway.service import Gateway
from iiot_common.localservers import Mosquitto, VictoriaMetrics
from tests.gateway.test_ingest import (
    BASE_TS,
    ListTx,
    MemorySink,
    Publisher,
    metric,
    sample,
    series_by_name,
)
from tests.waiting import wait_until

KILN_PROFILE = "kiln-rotary-cement"


def _config(
    tmp_path: Path, broker: Mosquitto, vm: VictoriaMetrics, max_points: int = 500
) -> GatewayConfig:
    return GatewayConfig(
        data_dir=tmp_path / "gw",
        mqtt=MqttConfig(url=broker.url, client_id="gw-test"),
        influx=InfluxConfig(url=vm.url, flush_interval=0.05, timeout=3),
        ingest=IngestConfig(max_points_per_device=max_points),
    )


@pytest.fixture
def gateway(tmp_path: Path, mosquitto: Mosquitto, victoria: VictoriaMetrics) -> Iterator[Gateway]:
    """A gateway with its own registry: ent-1/agent-1 with kiln-1 (a shipped profile)."""
    gw = Gateway(_config(tmp_path, mosquitto, victoria, max_points=20), serve_api=False)
    gw.start()
    reg = gw.registry
    reg.add_enterprise("ent-1", "Enterprise 1", "130102", "C30")
    reg.add_agent("ent-1", "agent-1", None)
    yield gw
    gw.stop()


@pytest.fixture
def publisher(mosquitto: Mosquitto) -> Iterator[Publisher]:
    pub = Publisher(mosquitto.url)
    yield pub
    pub.close()


def _birth(publisher: Publisher, gw: Gateway, *devices: dict[str, str]) -> None:
    birth = {"online": True, "bdseq": 1, "ts": BASE_TS, "version": "1.0", "devices": devices}
    publisher.raw("iiot/v1/ent-1/agent-1/agent", json.dumps(birth).encode())
    wait_until(
        lambda: all(gw.registry.get_device("ent-1", d["id"]) is not None for d in devices),
        what="birth",
    )


def _acked(gw: Gateway, n: int) -> None:
    wait_until(lambda: metric(gw, "iiot_gateway_messages_acked_total") >= n, what=f"{n} acks")


def test_sequence_gaps_are_counted_shown_on_the_device_and_logged_once(
    gateway: Gateway, publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    _birth(publisher, gateway, {"id": "kiln-1", "profile": "generic", "protocol": "modbus"})
    caplog.set_level(logging.WARNING, logger="gateway.ingest")
    publisher.data("kiln-1", 0, [sample(i, v=1.0) for i in range(3)])  # seq 0..2
    # The agent's spool cap dropped seq 3..943 (941 samples).
    publisher.data("kiln-1", 944, [sample(944 + i, v=2.0) for i in range(3)])
    publisher.data("kiln-1", 947, [sample(947, v=3.0)])
    publisher.data("kiln-1", 0, [sample(i, v=1.0) for i in range(3)])  # a replay: no gap
    _acked(gateway, 5)
    assert metric(gateway, "iiot_gateway_sequence_gaps_total") == 1
    assert metric(gateway, "iiot_gateway_missed_samples_total") == 941
    dev = gateway.registry.get_device("ent-1", "kiln-1")
    assert (dev["sequence_gaps"], dev["missed_samples"]) == (1, 941)
    assert dev["last_gap_ms"] == BASE_TS + 944_000
    gap_logs = [r for r in caplog.records if "sequence gap" in r.getMessage()]
    assert len(gap_logs) == 1 and gap_logs[0].__dict__["missed"] == 941

    # The agent starts over with a fresh spool: seq 0 again, newer timestamps. No gap.
    publisher.data("kiln-1", 0, [sample(2000 + i, v=4.0) for i in range(2)])
    publisher.data("kiln-1", 2, [sample(2002, v=4.0)])
    _acked(gateway, 7)
    assert metric(gateway, "iiot_gateway_sequence_gaps_total") == 1
    assert gateway.registry.get_device("ent-1", "kiln-1")["missed_samples"] == 941


def test_a_gap_across_a_gateway_restart_is_still_seen(tmp_path: Path) -> None:
    """The outbox remembers each device's last sample, so a restart does not hide a gap."""
    sink = MemorySink()
    topic = "iiot/v1/ent-1/agent-1/kiln-1/data"

    def body(seq: int) -> bytes:
        return json.dumps({"seq": seq, "samples": [sample(seq, v=1.0)]}).encode()

    outbox = Outbox(tmp_path / "outbox.db")
    proc = MessageProcessor(sink)
    with outbox.transaction() as tx:
        assert proc.handle(tx, topic, body(10)).gaps == 0
    proc.commit()
    outbox.close()
    outbox = Outbox(tmp_path / "outbox.db")
    proc = MessageProcessor(sink)  # a new process: nothing in memory
    with outbox.transaction() as tx:
        out = proc.handle(tx, topic, body(15))
    outbox.close()
    assert (out.gaps, out.missed, out.gap_detail) == (1, 4, "seq 11..14")


def test_non_finite_values_are_counted_and_the_rest_is_written(
    gateway: Gateway, publisher: Publisher, victoria: VictoriaMetrics
) -> None:
    _birth(publisher, gateway, {"id": "kiln-1", "profile": "generic", "protocol": "modbus"})
    topic = "iiot/v1/ent-1/agent-1/kiln-1/data"
    for seq, bad in enumerate((b"NaN", b"Infinity", b"-Infinity", b"1e400")):
        ts = BASE_TS + seq * 1000
        payload = b'{"seq":%d,"samples":[{"ts":%d,"values":{"bad":%s,"good":%d.5}}]}' % (
            seq,
            ts,
            bad,
            seq,
        )
        publisher.raw(topic, payload)
    _acked(gateway, 5)
    wait_until(lambda: metric(gateway, "iiot_gateway_written_lines_total") >= 4, what="writes")
    labels = {"reason": "non_finite_value"}
    assert metric(gateway, "iiot_gateway_dropped_values_total", labels) == 4
    assert metric(gateway, "iiot_gateway_rejected_total", {"reason": "not_json"}) == 0
    series = series_by_name(victoria)
    assert series["telemetry_good"][0]["values"] == [0.5, 1.5, 2.5, 3.5]
    assert "telemetry_bad" not in series
    latest = gateway.registry.get_device("ent-1", "kiln-1")["latest"]
    assert latest == {"good": 3.5}  # no NaN in the API's JSON
    assert all(math.isfinite(v) for v in latest.values())


def test_point_names_outside_the_profile_or_beyond_the_cap_are_dropped(
    gateway: Gateway,
    publisher: Publisher,
    victoria: VictoriaMetrics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _birth(
        publisher,
        gateway,
        {"id": "kiln-1", "profile": KILN_PROFILE, "protocol": "modbus"},
        {"id": "kiln-2", "profile": "site-special", "protocol": "modbus"},
    )
    caplog.set_level(logging.WARNING, logger="gateway.ingest")
    flood: dict[str, Any] = {f"junk_{i}": float(i) for i in range(10_000)}
    # kiln-1 names a shipped profile: only its points are written.
    publisher.data("kiln-1", 0, [sample(0, burning_zone_temp=3.2, **flood)])
    publisher.data("kiln-1", 1, [sample(1, burning_zone_temp=3.3, junk_1=1.0)])
    # kiln-2's profile is unknown here: the first 20 names are written (the cap).
    publisher.data("kiln-2", 0, [sample(0, **flood)])
    publisher.data("kiln-2", 1, [sample(1, junk_0=5.0, junk_9999=5.0)])
    _acked(gateway, 5)
    wait_until(lambda: metric(gateway, "iiot_gateway_written_lines_total") >= 4, what="writes")
    dropped = "iiot_gateway_dropped_values_total"
    assert metric(gateway, dropped, {"reason": "unknown_point"}) == 10_001
    assert metric(gateway, dropped, {"reason": "point_limit"}) == 10_000 - 20 + 1
    wait_until(
        lambda: (
            len(series_by_name(victoria).get("telemetry_junk_0", [{}])[0].get("values", [])) == 2
        ),
        what="kiln-2's second sample in the database",
    )
    series = series_by_name(victoria)
    kiln1 = [s for name, ss in series.items() for s in ss if s["metric"]["device"] == "kiln-1"]
    assert [s["metric"]["__name__"] for s in kiln1] == ["telemetry_burning_zone_temp"]
    kiln2 = {s["metric"]["__name__"] for ss in series.values() for s in ss} - {
        "telemetry_burning_zone_temp"
    }
    assert len(kiln2) == 20
    assert series["telemetry_junk_0"][0]["values"] == [0.0, 5.0]
    drops = [r for r in caplog.records if "point values dropped" in r.getMessage()]
    # Once per device per reason, not per message or per name.
    assert sorted((r.__dict__["device"], r.__dict__["reasons"]) for r in drops) == [
        ("ent-1/agent-1/kiln-1", "unknown_point"),
        ("ent-1/agent-1/kiln-2", "point_limit"),
    ]


def test_a_profile_uploaded_through_the_control_plane_bounds_its_devices() -> None:
    uploaded = {"kiln-site": {"id": "kiln-site", "points": [{"name": "shell_temp"}]}}
    sink = MemorySink(tags={("ent-1", "kiln-1"): ("kiln", "kiln-site")})
    proc = MessageProcessor(sink, profile_points=ProfilePoints(lambda: uploaded))
    body = json.dumps({"seq": 0, "samples": [sample(0, shell_temp=310.5, junk=1.0)]}).encode()
    tx = ListTx()
    out = proc.handle(tx, "iiot/v1/ent-1/agent-1/kiln-1/data", body)
    assert out.dropped == {"unknown_point": 1}
    assert len(tx.lines) == 1 and "shell_temp=310.5" in tx.lines[0] and "junk" not in tx.lines[0]


def test_gaps_are_not_tracked_under_a_shared_subscription() -> None:
    """Each instance of a shared group sees only some messages: no false gaps."""
    proc = MessageProcessor(MemorySink(), track_gaps=False)
    topic = "iiot/v1/ent-1/agent-1/kiln-1/data"
    for seq in (0, 5, 9):
        body = json.dumps({"seq": seq, "samples": [sample(seq, v=1.0)]}).encode()
        assert proc.handle(ListTx(), topic, body).gaps == 0

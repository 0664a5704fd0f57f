"""MQTT ingest end to end: a contract publisher → Mosquitto → gateway → victoria-metrics."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config import GatewayConfig, InfluxConfig, MqttConfig
from gateway.service import Gateway
from gateway.sink import SampleSummary
from iiot_common.localservers import Mosquitto, VictoriaMetrics
from protocols.mqtt.contract import Birth, DeviceState, Will
from tests.waiting import wait_until

BASE_TS = 1_700_000_000_000


class MemorySink:
    """An in-test registry: which agent belongs to which enterprise, and device tags."""

    def __init__(
        self,
        agents: dict[str, str] | None = None,
        tags: dict[tuple[str, str], tuple[str, str]] | None = None,
        owners: dict[tuple[str, str], str] | None = None,
    ) -> None:
        self.agents = agents if agents is not None else {"agent-1": "ent-1"}
        self.owners = owners if owners is not None else {}
        self.enterprises = set(self.agents.values())
        self.tags = tags if tags is not None else {}
        self.lock = threading.Lock()
        self.summaries: list[SampleSummary] = []
        self.births: list[tuple[str, str, Birth]] = []
        self.wills: list[tuple[str, str, Will]] = []
        self.states: list[tuple[str, str, str, DeviceState]] = []

    def check_publisher(self, enterprise: str, agent: str) -> str | None:
        if enterprise not in self.enterprises:
            return "unknown_enterprise"
        if agent not in self.agents:
            return "unknown_agent"
        if self.agents[agent] != enterprise:
            return "agent_enterprise_mismatch"
        return None

    def device_tags(self, enterprise: str, device: str) -> tuple[str, str] | None:
        return self.tags.get((enterprise, device))

    def device_owner(self, enterprise: str, device: str) -> str | None:
        return self.owners.get((enterprise, device))

    def on_birth(self, enterprise: str, agent: str, birth: Birth, *, codec: str = "json") -> None:
        with self.lock:
            self.births.append((enterprise, agent, birth))

    def on_will(self, enterprise: str, agent: str, will: Will) -> None:
        with self.lock:
            self.wills.append((enterprise, agent, will))

    def on_device_state(self, enterprise: str, agent: str, device: str, state: DeviceState) -> None:
        with self.lock:
            self.states.append((enterprise, agent, device, state))

    def on_samples(self, summary: SampleSummary) -> None:
        with self.lock:
            self.summaries.append(summary)

    def on_samples_many(self, summaries: Sequence[SampleSummary]) -> None:
        with self.lock:
            self.summaries.extend(summaries)


class ListTx:
    """An outbox transaction that keeps the lines added and takes every sample as new."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def first_time(self, dev: str, seq: int, ts: int) -> bool:
        return True

    def add(self, lines: list[str]) -> None:
        self.lines.extend(lines)


class Publisher:
    """A plain paho publisher following the contract, QoS 1."""

    def __init__(self, url: str, client_id: str = "test-publisher") -> None:
        port = int(url.rsplit(":", 1)[1])
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def raw(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(10)

    def data(
        self,
        device: str,
        seq: int,
        samples: list[dict[str, Any]],
        *,
        enterprise: str = "ent-1",
        agent: str = "agent-1",
    ) -> None:
        body = json.dumps({"seq": seq, "samples": samples}).encode()
        self.raw(f"iiot/v1/{enterprise}/{agent}/{device}/data", body)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def gateway_config(
    tmp_path: Path,
    broker: Mosquitto,
    vm: VictoriaMetrics | None,
    *,
    client_id: str = "gw-test",
    shared_group: str | None = None,
    name: str = "gw",
) -> GatewayConfig:
    return GatewayConfig(
        data_dir=tmp_path / name,
        mqtt=MqttConfig(url=broker.url, client_id=client_id, shared_group=shared_group),
        influx=InfluxConfig(url=vm.url if vm else None, flush_interval=0.05, timeout=3),
    )


def metric(gw: Gateway, name: str, labels: dict[str, str] | None = None) -> float:
    return gw.collector.get_sample_value(name, labels or {}) or 0.0


def series_by_name(vm: VictoriaMetrics) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in vm.export():
        out.setdefault(s["metric"]["__name__"], []).append(s)  # type: ignore[index]
    return out


def sample(i: int, **values: Any) -> dict[str, Any]:
    return {"ts": BASE_TS + i * 1000, "values": values}


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink(
        agents={"agent-1": "ent-1", "agent-2": "ent-2"},
        tags={("ent-1", "kiln-1"): ("kiln", "generic-kiln")},
    )


@pytest.fixture
def gateway(
    tmp_path: Path, mosquitto: Mosquitto, victoria: VictoriaMetrics, sink: MemorySink
) -> Iterator[Gateway]:
    gw = Gateway(gateway_config(tmp_path, mosquitto, victoria), sink=sink, serve_api=False)
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture
def publisher(mosquitto: Mosquitto) -> Iterator[Publisher]:
    pub = Publisher(mosquitto.url)
    yield pub
    pub.close()


def test_samples_land_with_series_tags_and_values(
    gateway: Gateway, publisher: Publisher, victoria: VictoriaMetrics, sink: MemorySink
) -> None:
    publisher.data("kiln-1", 0, [sample(0, temp=850.5, fan=True, alarms=2)])
    publisher.data(
        "kiln-1",
        1,
        [
            sample(1, temp=851.25, fan=False, alarms=3),
            {
                "ts": BASE_TS + 2000,
                "values": {"temp": None, "alarms": 4},
                "errors": {"temp": "timeout"},
            },
        ],
    )
    publisher.data("boiler-9", 5, [sample(0, pressure=1.5)])  # a device the registry lacks
    wait_until(lambda: metric(gateway, "iiot_gateway_written_lines_total") >= 4, what="writes")
    series = series_by_name(victoria)
    temp = series["telemetry_temp"]
    assert len(temp) == 1
    assert temp[0]["metric"] == {
        "__name__": "telemetry_temp",
        "enterprise": "ent-1",
        "agent": "agent-1",
        "device": "kiln-1",
        "family": "kiln",
        "profile": "generic-kiln",
    }
    assert temp[0]["values"] == [850.5, 851.25]  # the errored point is not a field
    assert temp[0]["timestamps"] == [BASE_TS, BASE_TS + 1000]
    assert series["telemetry_alarms"][0]["values"] == [2, 3, 4]
    assert series["telemetry_fan"][0]["values"] == [1, 0]
    # Unknown device: written without family/profile tags rather than dropped.
    assert series["telemetry_pressure"][0]["metric"] == {
        "__name__": "telemetry_pressure",
        "enterprise": "ent-1",
        "agent": "agent-1",
        "device": "boiler-9",
    }
    with sink.lock:
        kiln = [s for s in sink.summaries if s.device == "kiln-1"]
    assert sum(s.count for s in kiln) == 3
    # Latest good value of each point; the errored temp keeps its previous value.
    assert kiln[-1].last_ts == BASE_TS + 2000
    assert kiln[-1].latest == {"temp": 851.25, "fan": False, "alarms": 4}


def test_birth_will_and_state_reach_the_registry(
    gateway: Gateway, publisher: Publisher, sink: MemorySink
) -> None:
    birth = {
        "online": True,
        "bdseq": 3,
        "ts": BASE_TS,
        "version": "1.0",
        "devices": [{"id": "kiln-1", "profile": "generic-kiln", "protocol": "modbus"}],
    }
    publisher.raw("iiot/v1/ent-1/agent-1/agent", json.dumps(birth).encode())
    publisher.raw(
        "iiot/v1/ent-1/agent-1/kiln-1/state",
        json.dumps({"online": False, "ts": BASE_TS, "reason": "timeout"}).encode(),
    )
    publisher.raw("iiot/v1/ent-1/agent-1/agent", b'{"online": false, "bdseq": 3}')
    wait_until(lambda: len(sink.wills) == 1, what="will")
    assert sink.births[0][2].devices[0].id == "kiln-1"
    assert sink.states[0][2] == "kiln-1" and sink.states[0][3].reason == "timeout"


def test_replayed_samples_are_written_once(
    gateway: Gateway, publisher: Publisher, victoria: VictoriaMetrics
) -> None:
    samples = [sample(i, v=float(i)) for i in range(5)]
    publisher.data("kiln-1", 100, samples)
    publisher.data("kiln-1", 100, samples)  # replay after an outage: same seq and ts
    publisher.data("kiln-1", 102, samples[2:4])  # partial overlap
    # A reset agent starts again at seq 0 with newer timestamps: kept.
    publisher.data("kiln-1", 0, [sample(10, v=10.0)])
    wait_until(lambda: metric(gateway, "iiot_gateway_messages_acked_total") >= 4, what="acks")
    wait_until(lambda: gateway.outbox is not None and gateway.outbox.pending_lines == 0)
    values = series_by_name(victoria)["telemetry_v"][0]["values"]
    assert sorted(values) == [0, 1, 2, 3, 4, 10]
    assert metric(gateway, "iiot_gateway_duplicate_samples_total") == 7


def test_a_batch_is_read_per_device_replays_gaps_and_refusals_included(
    gateway: Gateway, publisher: Publisher, victoria: VictoriaMetrics
) -> None:
    def batch(parts: dict[str, tuple[int, list[dict[str, Any]]]]) -> bytes:
        devices = {d: {"seq": q, "samples": ss} for d, (q, ss) in parts.items()}
        return json.dumps({"devices": devices}).encode()

    topic = "iiot/v1/ent-1/agent-1/batch"
    publisher.raw(
        topic, batch({"kiln-1": (0, [sample(0, v=1.0)]), "kiln-2": (0, [sample(0, v=5.0)])})
    )
    # kiln-1 replayed (dropped), kiln-2 skips seq 1 and 2 (a gap of its own).
    publisher.raw(
        topic,
        batch(
            {"kiln-1": (0, [sample(0, v=1.0), sample(1, v=2.0)]), "kiln-2": (3, [sample(3, v=6.0)])}
        ),
    )
    # Refused whole, with the reason: a bad device id, a bad sample, another agent's batch.
    publisher.raw(topic, b'{"devices": {"kiln 3": {"seq": 0, "samples": [{"ts": 1}]}}}')
    publisher.raw(topic, b'{"devices": {"kiln-1": {"seq": 2, "samples": [{"ts": -1}]}}}')
    publisher.raw(topic, b'{"devices": {}}')
    publisher.raw("iiot/v1/ent-1/agent-2/batch", batch({"kiln-1": (9, [sample(9, v=9.0)])}))
    publisher.raw("iiot/v1/ent-1/agent-1/kiln-1/batch", batch({"kiln-1": (9, [sample(9)])}))
    wait_until(lambda: metric(gateway, "iiot_gateway_messages_acked_total") >= 7, what="acks")
    wait_until(lambda: gateway.outbox is not None and gateway.outbox.pending_lines == 0)
    by_device = {
        s["metric"]["device"]: sorted(s["values"]) for s in series_by_name(victoria)["telemetry_v"]
    }
    assert by_device == {"kiln-1": [1, 2], "kiln-2": [5, 6]}
    assert metric(gateway, "iiot_gateway_duplicate_samples_total") == 1
    assert metric(gateway, "iiot_gateway_sequence_gaps_total") == 1
    assert metric(gateway, "iiot_gateway_missed_samples_total") == 2
    for reason, n in (("bad_payload", 3), ("agent_enterprise_mismatch", 1), ("bad_topic", 1)):
        assert metric(gateway, "iiot_gateway_rejected_total", {"reason": reason}) == n, reason


def test_bad_messages_are_rejected_by_reason_and_good_ones_still_land(
    gateway: Gateway, publisher: Publisher, victoria: VictoriaMetrics
) -> None:
    good = json.dumps({"seq": 0, "samples": [sample(0, v=1.0)]}).encode()
    cases = [
        ("iiot/v1/ent-1/agent-1/kiln-1/data", b"\xff\xfenot json", "not_json"),
        ("iiot/v1/ent-1/agent-1/kiln-1/data", b'{"seq": -1, "samples": []}', "bad_payload"),
        (
            "iiot/v1/ent-1/agent-1/kiln-1/data",
            b'{"seq": 1, "samples": [{"ts": 1, "values": {"a b": 1}}]}',
            "bad_payload",
        ),
        ("iiot/v1/ent-1/agent-1/kil%n/data", good, "bad_identifier"),
        ("iiot/v1/ent-1/agent-1/kiln-1/telemetry", good, "bad_topic"),
        ("iiot/v1/ent-9/agent-1/kiln-1/data", good, "unknown_enterprise"),
        ("iiot/v1/ent-1/agent-7/kiln-1/data", good, "unknown_agent"),
        ("iiot/v1/ent-1/agent-2/kiln-1/data", good, "agent_enterprise_mismatch"),
        # Numbers past what SQLite and InfluxDB hold are refused, not left to jam a batch.
        (
            "iiot/v1/ent-1/agent-1/kiln-1/data",
            b'{"seq": 9223372036854775807, "samples": [{"ts": 1}, {"ts": 2}]}',
            "bad_payload",
        ),
        (
            "iiot/v1/ent-1/agent-1/kiln-1/data",
            b'{"seq": 18446744073709551616, "samples": [{"ts": 1, "values": {"v": 1}}]}',
            "bad_payload",
        ),
        (
            "iiot/v1/ent-1/agent-1/kiln-1/data",
            b'{"seq": 7, "samples": [{"ts": 99999999999999999, "values": {"v": 1}}]}',
            "bad_payload",
        ),
        (
            "iiot/v1/ent-1/agent-1/agent",
            b'{"online": true, "bdseq": 1180591620717411303424, "ts": 1}',
            "bad_payload",
        ),
    ]
    publisher.data("kiln-1", 0, [sample(0, v=1.0)])
    for topic, payload, _ in cases:
        publisher.raw(topic, payload)
        publisher.raw(topic, payload)
    publisher.data("kiln-1", 1, [sample(1, v=2.0)])
    wait_until(
        lambda: metric(gateway, "iiot_gateway_messages_acked_total") >= 2 + 2 * len(cases),
        what="all messages acknowledged",
    )
    expected: dict[str, int] = {}
    for _, _, reason in cases:
        expected[reason] = expected.get(reason, 0) + 2
    for reason, count in expected.items():
        got = metric(gateway, "iiot_gateway_rejected_total", {"reason": reason})
        assert got == count, reason
    wait_until(lambda: gateway.outbox is not None and gateway.outbox.pending_lines == 0)
    assert series_by_name(victoria)["telemetry_v"][0]["values"] == [1, 2]


def test_messages_published_while_down_arrive_after_restart(
    tmp_path: Path, mosquitto: Mosquitto, sink: MemorySink, publisher: Publisher
) -> None:
    cfg = gateway_config(tmp_path, mosquitto, None)
    gw = Gateway(cfg, sink=sink, serve_api=False)
    gw.start()
    try:
        publisher.data("kiln-1", 0, [sample(0, v=0.0)])
        wait_until(lambda: metric(gw, "iiot_gateway_samples_total") == 1)
    finally:
        gw.stop()
    for i in range(1, 20):
        publisher.data("kiln-1", i, [sample(i, v=float(i))])
    gw = Gateway(cfg, sink=sink, serve_api=False)
    gw.start()
    try:
        wait_until(lambda: gw.outbox is not None and gw.outbox.pending_lines == 20)
    finally:
        gw.stop()


class _BrokenSink(MemorySink):
    def device_tags(self, enterprise: str, device: str) -> tuple[str, str] | None:
        if device == "cursed":
            raise RuntimeError("registry bug")
        return None


def test_a_registry_failure_rejects_that_message_only() -> None:
    from gateway.ingest import MessageProcessor

    proc = MessageProcessor(_BrokenSink())
    body = json.dumps({"seq": 0, "samples": [sample(0, v=1.0)]}).encode()
    bad = proc.handle(ListTx(), "iiot/v1/ent-1/agent-1/cursed/data", body)
    good = proc.handle(ListTx(), "iiot/v1/ent-1/agent-1/kiln-1/data", body)
    assert bad.reject == "internal_error" and "registry bug" in bad.detail
    assert good.reject is None and good.lines == 1


def test_a_registry_failure_in_a_batch_rejects_that_device_s_part_only() -> None:
    from gateway.ingest import MessageProcessor

    proc = MessageProcessor(_BrokenSink())
    part = {"seq": 0, "samples": [sample(0, v=1.0)]}
    body = json.dumps({"devices": {"kiln-1": part, "cursed": part, "kiln-2": part}}).encode()
    tx = ListTx()
    out = proc.handle(tx, "iiot/v1/ent-1/agent-1/batch", body)
    assert out.reject is None and out.parts is not None
    by_device = {p.device: p for p in out.parts}
    assert by_device["cursed"].reject == "internal_error"
    assert "registry bug" in by_device["cursed"].detail
    # The others' lines are written and their registry updates go with them, in one call.
    for dev in ("kiln-1", "kiln-2"):
        assert by_device[dev].reject is None and by_device[dev].lines == 1
    assert len(tx.lines) == 2
    assert out.notify is not None
    told = MemorySink()
    out.notify(told)
    assert [s.device for s in told.summaries] == ["kiln-1", "kiln-2"]

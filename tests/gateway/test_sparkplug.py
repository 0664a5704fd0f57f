"""The gateway as a Sparkplug B host, against real Mosquitto and victoria-metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from device_profiles.loader import load_profiles
from gateway.ingest import MessageProcessor
from gateway.provisioning import Provisioner
from gateway.ratios import compute_ratios
from gateway.registry import Registry
from gateway.service import Gateway
from iiot_common.localservers import Mosquitto, VictoriaMetrics
from protocols.mqtt.sparkplug.node import BDSEQ, REBIRTH
from protocols.mqtt.sparkplug.payload import DataType, Payload, set_value
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from tests.edge_agent.helpers import agent_dict, modbus_device
from tests.gateway.test_ingest import (
    BASE_TS,
    ListTx,
    MemorySink,
    Publisher,
    gateway_config,
    metric,
    series_by_name,
)
from tests.gateway.test_provisioning import _accepted, _Client, _config
from tests.sparkplug_client import SpSubscriber
from tests.waiting import wait_until


def _payload(seq: int | None, metrics: list[dict[str, Any]], ts: int = BASE_TS) -> bytes:
    msg = Payload()
    msg.timestamp = ts
    if seq is not None:
        msg.seq = seq
    for spec in metrics:
        m = msg.metrics.add()
        for key in ("name", "alias", "is_historical"):
            if key in spec:
                setattr(m, key, spec[key])
        m.timestamp = spec.get("ts", ts)
        dt = spec.get("datatype")
        if dt is not None:
            m.datatype = dt
        if "raw" in spec:
            setattr(m, spec["raw"][0], spec["raw"][1])
        elif "value" in spec:
            assert dt is not None, "a value needs its datatype"
            set_value(m, DataType(dt), spec["value"])
    return bytes(msg.SerializeToString())


_T = "spBv1.0/ent-1"


def _birth_payloads(bdseq: int = 5) -> tuple[bytes, bytes]:
    nbirth = _payload(
        0,
        [
            {"name": BDSEQ, "datatype": DataType.UINT64, "value": bdseq},
            {"name": REBIRTH, "datatype": DataType.BOOLEAN, "value": False},
        ],
    )
    dbirth = _payload(
        1,
        [
            {"name": "temp", "alias": 1, "datatype": DataType.DOUBLE, "value": 800.0},
            {"name": "speed", "alias": 2, "datatype": DataType.INT16, "value": 3},
        ],
    )
    return nbirth, dbirth


def _births(pub: Publisher, bdseq: int = 5) -> None:
    nbirth, dbirth = _birth_payloads(bdseq)
    pub.raw(f"{_T}/NBIRTH/agent-1", nbirth, qos=0)
    pub.raw(f"{_T}/DBIRTH/agent-1/kiln-1", dbirth, qos=0)


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink(tags={("ent-1", "kiln-1"): ("kiln", "generic-kiln")})


@pytest.fixture
def gateway(
    tmp_path: Path, mosquitto: Mosquitto, victoria: VictoriaMetrics, sink: MemorySink
) -> Iterator[Gateway]:
    gw = Gateway(gateway_config(tmp_path, mosquitto, victoria), sink=sink, serve_api=False)
    gw.start()
    yield gw
    gw.stop()


def _rejected(gw: Gateway, reason: str) -> float:
    return metric(gw, "iiot_gateway_rejected_total", {"reason": reason})


def test_births_data_death_and_bad_input(
    gateway: Gateway, mosquitto: Mosquitto, victoria: VictoriaMetrics, sink: MemorySink
) -> None:
    pub = Publisher(mosquitto.url, client_id="tahu-like-node")
    try:
        _births(pub)
        pub.raw(
            f"{_T}/DDATA/agent-1/kiln-1",
            _payload(
                2,
                [
                    {"alias": 1, "raw": ("double_value", 801.5)},
                    {"alias": 2, "raw": ("int_value", 0xFFFFFFFE)},  # -2 as Int16
                    # A wrong datatype: this metric is dropped, the rest of the message kept.
                    {"alias": 2, "raw": ("string_value", "x"), "ts": BASE_TS + 1},
                ],
            ),
        )
        pub.raw(f"{_T}/DDATA/agent-1/kiln-1", b"\xff\x00garbage")
        pub.raw("spBv1.0/STATE/some-host", b'{"online": true, "timestamp": 1}')
        # seq 9 after 2: a gap; a historical sample is written, not counted as "now".
        pub.raw(
            f"{_T}/DDATA/agent-1/kiln-1",
            _payload(
                9,
                [
                    {
                        "alias": 1,
                        "raw": ("double_value", 700.0),
                        "ts": BASE_TS - 5000,
                        "is_historical": True,
                    },
                ],
            ),
        )
        pub.raw(
            f"{_T}/NDEATH/agent-1",
            _payload(None, [{"name": BDSEQ, "datatype": DataType.UINT64, "value": 4}]),
        )
        pub.raw(
            f"{_T}/NDEATH/agent-1",
            _payload(None, [{"name": BDSEQ, "datatype": DataType.UINT64, "value": 5}]),
        )
        wait_until(lambda: len(sink.wills) == 1, what="the NDEATH of the live session")
        wait_until(
            lambda: (
                len(series_by_name(victoria).get("telemetry_temp", [{"values": []}])[0]["values"])
                == 2
            ),
            what="temp samples in victoria-metrics",
        )
    finally:
        pub.close()
    assert _rejected(gateway, "stale_ndeath") == 1
    assert _rejected(gateway, "bad_protobuf") == 1
    assert _rejected(gateway, "bad_topic") == 0  # a host's STATE is no error
    assert sink.wills[0][2].bdseq == 5
    birth_devices = [d for _e, _a, b in sink.births for d in b.devices]
    assert [d.id for d in birth_devices] == ["kiln-1"]
    assert sink.states[0][2:] and sink.states[0][3].online
    assert (
        metric(gateway, "iiot_gateway_sparkplug_dropped_metrics_total", {"reason": "bad_datatype"})
        == 1
    )
    assert metric(gateway, "iiot_gateway_sparkplug_seq_gaps_total", {"node": "ent-1/agent-1"}) == 1
    series = series_by_name(victoria)
    temp = series["telemetry_temp"][0]
    # Same measurement and tags as the JSON contract's data.
    assert temp["metric"] == {
        "__name__": "telemetry_temp",
        "enterprise": "ent-1",
        "agent": "agent-1",
        "device": "kiln-1",
        "family": "kiln",
        "profile": "generic-kiln",
    }
    assert sorted(zip(temp["timestamps"], temp["values"], strict=True)) == [
        (BASE_TS - 5000, 700.0),
        (BASE_TS, 801.5),
    ]
    assert series["telemetry_speed"][0]["values"] == [-2]
    # The historical sample reached the time series only, not the registry's "now".
    with sink.lock:
        assert [s.last_ts for s in sink.summaries] == [BASE_TS]


def test_unknown_aliases_ask_the_node_for_a_rebirth_once(
    gateway: Gateway, mosquitto: Mosquitto
) -> None:
    pub = Publisher(mosquitto.url, client_id="forgetful-node")
    try:
        with SpSubscriber(mosquitto.port, client_id="watch-ncmd") as sub:
            _births(pub)
            for seq in (2, 3, 4):
                pub.raw(
                    f"{_T}/DDATA/agent-1/kiln-1",
                    _payload(seq, [{"alias": 77, "raw": ("double_value", 1.0)}]),
                )
            wait_until(lambda: bool(sub.of("NCMD")), what="a Rebirth request")
            time.sleep(0.5)
            ncmds = sub.of("NCMD")
    finally:
        pub.close()
    assert len(ncmds) == 1, "Rebirth requests are rate-limited per node"
    assert str(ncmds[0].topic) == "spBv1.0/ent-1/NCMD/agent-1"
    assert ncmds[0].metric(REBIRTH).boolean_value is True
    assert _rejected(gateway, "unknown_alias") == 3


def _write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _spawn(cmd: list[str], log: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})


async def test_sparkplug_agent_counts_in_ratios_and_kill_9_takes_its_devices_offline(
    tmp_path: Path, mosquitto: Mosquitto, victoria: VictoriaMetrics
) -> None:
    data = tmp_path / "gw"
    data.mkdir()
    reg = Registry(f"sqlite:///{data / 'registry.db'}")
    reg.add_enterprise("ent-1", "Test Works", "130102", "C30")
    reg.add_agent("ent-1", "agent-1", None)
    reg.close()
    gw = Gateway(gateway_config(tmp_path, mosquitto, victoria), serve_api=False)
    gw.start()
    dev = SimDevice(load_profiles()["kiln-rotary-cement"], device_id="kiln-1", seed=2)
    sim = ModbusSimServer({1: dev}, port=0)
    await sim.start()
    cfg = agent_dict(
        tmp_path,
        mosquitto.port,
        [modbus_device("kiln-1", "kiln-rotary-cement", sim.port, interval=0.1)],
    )
    cfg["mqtt"]["codec"] = "sparkplug"
    cfg["mqtt"]["keepalive"] = 5
    config = _write(tmp_path / "agent.yaml", cfg)
    iiot = str(Path(sys.executable).parent / "iiot")
    log = (tmp_path / "agent.log").open("wb")
    proc = _spawn([iiot, "agent", "run", "-c", str(config)], log)
    try:

        def online() -> bool:
            view = gw.registry.get_device("ent-1", "kiln-1")
            return bool(view and view["online"])

        await _until(online, 30, "kiln-1 online through Sparkplug")
        ratios = compute_ratios(gw.registry, None)
        assert ratios["overall"]["online"] == 1, ratios["overall"]
        await _until(
            lambda: len(series_by_name(victoria)) > 3,
            15,
            "Sparkplug data in victoria-metrics",
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        await _until(lambda: not online(), 20, "kiln-1 offline after the broker's NDEATH")
        view = gw.registry.get_device("ent-1", "kiln-1")
        assert view is not None and view["state_reason"] == "agent offline"
        # Every series carries the tags the birth gave, the first samples' too.
        for series in series_by_name(victoria).values():
            for s in series:
                assert s["metric"]["profile"] == "kiln-rotary-cement", s["metric"]
                assert s["metric"]["family"] == "kiln" and s["metric"]["agent"] == "agent-1"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        await sim.stop()
        gw.stop()


async def _until(cond: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await asyncio.to_thread(cond):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_sparkplug_agent_cannot_publish_as_another_group_or_node(tmp_path: Path) -> None:
    pw, acl = tmp_path / "auth" / "passwd", tmp_path / "auth" / "acl"
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    reg.add_enterprise("ent-a", "Enterprise A", "130102", "C30")
    reg.add_enterprise("ent-b", "Enterprise B", "130203", "C31")
    Provisioner(reg, _config(pw, acl, None)).sync()
    (tmp_path / "mq").mkdir()
    broker = Mosquitto(tmp_path / "mq", password_file=pw, acl_file=acl).start()
    try:
        prov = Provisioner(reg, _config(pw, acl, None))
        _id, key_a = reg.create_provisioning_key("ent-a")
        _id, key_b = reg.create_provisioning_key("ent-b")
        a = prov.provision(key_a, "edge-a")
        prov.provision(key_b, "edge-b")
        broker.reload()
        wait_until(lambda: _accepted(broker.port, "edge-a", a["password"]), what="the reload")
        gw = _Client(broker.port, "gateway", "gw-pass")
        agent_a = _Client(broker.port, "edge-a", a["password"])
        try:
            gw.subscribe("spBv1.0/#")
            for topic in (
                "spBv1.0/ent-b/NBIRTH/edge-a",  # another group
                "spBv1.0/ent-a/NBIRTH/edge-b",  # another node
                "spBv1.0/ent-a/DDATA/edge-b/dev-1",
                "spBv1.0/ent-b/DDATA/edge-b/dev-1",
            ):
                agent_a.publish(topic, b"forged")
            agent_a.publish("spBv1.0/ent-a/NBIRTH/edge-a", b"own-birth")
            agent_a.publish("spBv1.0/ent-a/DDATA/edge-a/dev-1", b"own-data")
            gw.wait_for(b"own-birth")
            gw.wait_for(b"own-data")
            assert b"forged" not in [p for _t, p in gw.messages]
            # The agent reads its own commands, not another node's.
            agent_a.subscribe("spBv1.0/ent-a/NCMD/edge-a")
            agent_a.subscribe("spBv1.0/ent-a/NCMD/edge-b")
            gw.publish("spBv1.0/ent-a/NCMD/edge-b", b"not-for-a")
            gw.publish("spBv1.0/ent-a/NCMD/edge-a", b"rebirth-a")
            agent_a.wait_for(b"rebirth-a")
            assert b"not-for-a" not in [p for _t, p in agent_a.messages]
        finally:
            gw.close()
            agent_a.close()
    finally:
        broker.stop()
        reg.close()


def test_data_queued_while_the_gateway_was_down_is_read_with_the_kept_births(
    tmp_path: Path, mosquitto: Mosquitto, victoria: VictoriaMetrics, sink: MemorySink
) -> None:
    config = gateway_config(tmp_path, mosquitto, victoria)
    gw = Gateway(config, sink=sink, serve_api=False)
    gw.start()
    pub = Publisher(mosquitto.url, client_id="steady-node")
    try:
        _births(pub)
        pub.raw(
            f"{_T}/DDATA/agent-1/kiln-1", _payload(2, [{"alias": 1, "raw": ("double_value", 1.0)}])
        )
        wait_until(lambda: len(sink.summaries) == 1, what="the first DDATA")
        gw.stop()
        # The gateway's persistent session queues these; no birth comes with them.
        for i in range(3, 6):
            pub.raw(
                f"{_T}/DDATA/agent-1/kiln-1",
                _payload(i, [{"alias": 1, "raw": ("double_value", float(i)), "ts": BASE_TS + i}]),
            )
        gw = Gateway(config, sink=sink, serve_api=False)
        gw.start()
        wait_until(
            lambda: (
                sorted(
                    v
                    for s in series_by_name(victoria).get("telemetry_temp", [])
                    for v in s["values"]
                )
                == [1.0, 3.0, 4.0, 5.0]
            ),
            what="the queued DDATA in victoria-metrics",
        )
        assert _rejected(gw, "unknown_alias") == 0
        assert metric(gw, "iiot_gateway_sparkplug_rebirth_requests_total") == 0
        assert metric(gw, "iiot_gateway_sparkplug_seq_gaps_total", {"node": "ent-1/agent-1"}) == 0
    finally:
        pub.close()
        gw.stop()


_KINDS = ["NBIRTH", "NDEATH", "NDATA", "DBIRTH", "DDEATH", "DDATA", "NCMD", "XX"]


@given(
    kinds=st.lists(st.sampled_from(_KINDS), min_size=1, max_size=8),
    blobs=st.lists(st.binary(max_size=200), min_size=1, max_size=8),
)
@settings(max_examples=300, deadline=None)
def test_garbage_never_raises_and_good_data_still_lands(
    kinds: list[str], blobs: list[bytes]
) -> None:
    proc = MessageProcessor(MemorySink(tags={("ent-1", "kiln-1"): ("kiln", "generic-kiln")}))
    tx = ListTx()
    births = _birth_payloads()
    proc.handle(tx, f"{_T}/NBIRTH/agent-1", births[0])
    proc.handle(tx, f"{_T}/DBIRTH/agent-1/kiln-1", births[1])
    for kind, blob in zip(kinds, blobs, strict=False):
        device = "/kiln-1" if kind.startswith("D") else ""
        out = proc.handle(tx, f"{_T}/{kind}/agent-1{device}", blob)
        assert out.reject != "internal_error", out.detail
    # Garbage that parses as an (empty) birth resets the node, as a birth does: born again.
    proc.handle(tx, f"{_T}/NBIRTH/agent-1", births[0])
    proc.handle(tx, f"{_T}/DBIRTH/agent-1/kiln-1", births[1])
    good = _payload(2, [{"alias": 1, "raw": ("double_value", 5.5)}], ts=BASE_TS + 99)
    out = proc.handle(tx, f"{_T}/DDATA/agent-1/kiln-1", good)
    assert out.reject is None and any("temp=5.5" in line for line in tx.lines)


def test_two_instances_in_a_shared_group_read_every_ddata_once(
    tmp_path: Path, mosquitto: Mosquitto, victoria: VictoriaMetrics
) -> None:
    gws = []
    for name in ("gw-a", "gw-b"):
        cfg = gateway_config(
            tmp_path, mosquitto, victoria, client_id=name, shared_group="gws", name=name
        )
        gw = Gateway(
            cfg, sink=MemorySink(tags={("ent-1", "kiln-1"): ("kiln", "k")}), serve_api=False
        )
        gw.start()
        gws.append(gw)
    pub = Publisher(mosquitto.url, client_id="shared-node")
    n = 40
    try:
        _births(pub)
        time.sleep(0.5)  # both instances hold the births before the data comes
        for i in range(n):
            pub.raw(
                f"{_T}/DDATA/agent-1/kiln-1",
                _payload(
                    2 + i, [{"alias": 1, "raw": ("double_value", float(i)), "ts": BASE_TS + i}]
                ),
            )
        wait_until(
            lambda: (
                sum(len(s["values"]) for s in series_by_name(victoria).get("telemetry_temp", []))
                >= n
            ),
            what="every DDATA in victoria-metrics",
        )
        time.sleep(0.5)
        values = sorted(
            v for s in series_by_name(victoria).get("telemetry_temp", []) for v in s["values"]
        )
        # Both instances took part, neither lacked the aliases, nothing was written twice.
        assert values == [float(i) for i in range(n)]
        assert all(metric(gw, "iiot_gateway_samples_total") > 0 for gw in gws)
        assert all(_rejected(gw, "unknown_alias") == 0 for gw in gws)
        assert all(metric(gw, "iiot_gateway_sparkplug_rebirth_requests_total") == 0 for gw in gws)
    finally:
        pub.close()
        for gw in gws:
            gw.stop()


def test_ddata_held_back_by_the_node_is_no_seq_gap_and_a_lost_one_still_is(
    gateway: Gateway, mosquitto: Mosquitto, victoria: VictoriaMetrics, sink: MemorySink
) -> None:
    """A node's client sends a QoS 0 birth past QoS 1 DDATA waiting for its in-flight
    window: the DDATA numbered before the birth arrive after it, late but not lost."""
    pub = Publisher(mosquitto.url, client_id="busy-node")

    def ddata(seq: int) -> None:
        temp = {"alias": 1, "raw": ("double_value", float(seq)), "ts": BASE_TS + seq}
        pub.raw(f"{_T}/DDATA/agent-1/kiln-1", _payload(seq, [temp]), qos=1)

    try:
        _births(pub)  # NBIRTH seq 0, DBIRTH seq 1
        ddata(2)
        ddata(3)
        # DDATA 4 and 5 held back; the DBIRTH of a device coming online (seq 6) overtakes.
        _, dbirth = _birth_payloads()
        reborn = _payload(6, [{"name": "temp", "alias": 1, "datatype": DataType.DOUBLE}])
        assert dbirth != reborn
        pub.raw(f"{_T}/DBIRTH/agent-1/kiln-2", reborn, qos=0)
        ddata(4)
        ddata(5)
        ddata(7)
        # seq 8 is lost for good: it is missing when the session ends.
        ddata(9)
        wait_until(
            lambda: (
                sum(len(s["values"]) for s in series_by_name(victoria).get("telemetry_temp", []))
                == 6
            ),
            what="every DDATA in victoria-metrics",
        )
        gaps_before_death = metric(
            gateway, "iiot_gateway_sparkplug_seq_gaps_total", {"node": "ent-1/agent-1"}
        )
        pub.raw(
            f"{_T}/NDEATH/agent-1",
            _payload(None, [{"name": BDSEQ, "datatype": DataType.UINT64, "value": 5}]),
        )
        wait_until(lambda: len(sink.wills) == 1, what="the NDEATH")
    finally:
        pub.close()
    assert gaps_before_death == 0  # 4 and 5 came late; 8 may still come
    assert metric(gateway, "iiot_gateway_sparkplug_seq_gaps_total", {"node": "ent-1/agent-1"}) == 1
    values = sorted(
        v for s in series_by_name(victoria)["telemetry_temp"] for v in s["values"] if v < 100
    )
    assert values == [2.0, 3.0, 4.0, 5.0, 7.0, 9.0]

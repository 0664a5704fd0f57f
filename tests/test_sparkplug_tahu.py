"""Interoperability with Eclipse Tahu's JavaScript Sparkplug B packages (npm).

The fixture installs ``sparkplug-payload`` and ``sparkplug-client`` into a cache folder
(``IIOT_TEST_CACHE``, default ``~/.cache/iiot-tests``) and runs Node.js with them:
our agent's messages are decoded by Tahu, and a Tahu edge node publishes into our gateway.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient

from device_profiles.loader import load_profiles
from edge_agent.agent import Agent
from edge_agent.config import parse_config
from gateway.ratios import compute_ratios
from gateway.registry import Registry
from gateway.service import Gateway
from iiot_common.localservers import Mosquitto, VictoriaMetrics, require
from protocols.mqtt.control import WriteResult, WriteStatus
from protocols.mqtt.sparkplug.codec import read_samples
from protocols.mqtt.sparkplug.payload import DataType, datatype_for
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from tests.edge_agent.helpers import agent_dict, modbus_device, wait_for
from tests.gateway.test_ingest import gateway_config, series_by_name
from tests.gateway.test_provisioning import _Client
from tests.sparkplug_client import SpSubscriber

_PACKAGES = ["sparkplug-payload@1.0.3", "sparkplug-client@3.2.4"]
_HERE = Path(__file__).parent / "tahu"
_PROFILE = "kiln-rotary-cement"


@pytest.fixture(scope="session")
def tahu() -> dict[str, str]:
    """Environment to run Node.js with Tahu's packages on its module path."""
    node = require("node", "nodejs")
    npm = require("npm", "npm")
    cache = Path(os.environ.get("IIOT_TEST_CACHE", Path.home() / ".cache" / "iiot-tests"))
    prefix = cache / "npm"
    modules = prefix / "node_modules"
    if not all((modules / p.rsplit("@", 1)[0] / "package.json").exists() for p in _PACKAGES):
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix), *_PACKAGES],
            check=True,
            timeout=600,
            capture_output=True,
        )
    return {**os.environ, "NODE_PATH": str(modules), "IIOT_NODE": node}


def _tahu_decode(env: dict[str, str], payloads: list[bytes]) -> list[dict[str, Any]]:
    res = subprocess.run(
        [env["IIOT_NODE"], str(_HERE / "decode.js")],
        input=json.dumps([base64.b64encode(p).decode() for p in payloads]),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    out: list[dict[str, Any]] = json.loads(res.stdout)
    return out


_TAHU_TYPE = {
    DataType.INT16: "Int16",
    DataType.INT32: "Int32",
    DataType.INT64: "Int64",
    DataType.UINT16: "UInt16",
    DataType.UINT32: "UInt32",
    DataType.FLOAT: "Float",
    DataType.DOUBLE: "Double",
    DataType.BOOLEAN: "Boolean",
    DataType.STRING: "String",
}


def _num(v: Any) -> Any:
    return int(v) if isinstance(v, str) else v


async def test_tahu_decodes_our_agent(
    tmp_path: Path, mosquitto: Mosquitto, tahu: dict[str, str]
) -> None:
    dev = SimDevice(load_profiles()[_PROFILE], device_id="kiln-1", seed=1)
    sim = ModbusSimServer({1: dev}, port=0)
    await sim.start()
    cfg = agent_dict(tmp_path, mosquitto.port, [modbus_device("kiln-1", _PROFILE, sim.port)])
    cfg["mqtt"]["codec"] = "sparkplug"
    agent = Agent(parse_config(cfg))
    with SpSubscriber(mosquitto.port) as sub:
        await agent.start()
        try:
            await wait_for(lambda: len(sub.of("DDATA")) >= 3, 15, "DDATA")
        finally:
            await agent.stop()
            await sim.stop()
        await wait_for(lambda: bool(sub.of("NDEATH")), 5, "NDEATH")
    msgs = sub.all()
    decoded = await asyncio.to_thread(_tahu_decode, tahu, [m.raw for m in msgs])
    kinds = [m.topic.type.value for m in msgs]
    nb = decoded[kinds.index("NBIRTH")]
    db = decoded[kinds.index("DBIRTH")]
    nd = decoded[kinds.index("NDEATH")]
    ours_bdseq = int(msgs[0].metric("bdSeq").long_value)
    by_name = {m["name"]: m for m in nb["metrics"]}
    assert by_name["bdSeq"]["type"] == "UInt64" and _num(by_name["bdSeq"]["value"]) == ours_bdseq
    assert by_name["Node Control/Rebirth"] == {
        "name": "Node Control/Rebirth",
        "type": "Boolean",
        "value": False,
        "timestamp": by_name["Node Control/Rebirth"]["timestamp"],
    }
    assert _num(nb["seq"]) == 0
    assert _num(nd["metrics"][0]["value"]) == ours_bdseq
    # Tahu reads every point of the profile with our alias, datatype and units.
    born = {m["name"]: m for m in db["metrics"]}
    aliases: dict[int, tuple[str, int]] = {}
    for p in load_profiles()[_PROFILE].points:
        m = born[p.name]
        assert m["type"] == _TAHU_TYPE[datatype_for(p)], p.name
        if p.unit:
            assert m["properties"]["engUnit"] == {"type": "String", "value": p.unit}
        aliases[_num(m["alias"])] = (p.name, datatype_for(p))
    # DDATA: Tahu's values are ours, metric for metric; seq counts on from the births.
    seqs = [_num(d["seq"]) for d, k in zip(decoded, kinds, strict=True) if k != "NDEATH"]
    assert seqs == list(range(len(seqs)))
    compared = 0
    for m, d in zip(msgs, decoded, strict=True):
        if m.topic.type.value != "DDATA":
            continue
        ours = read_samples(m.payload.metrics, lambda x: aliases[x.alias])
        values = {(ts, n): v for ts, vals, _e, _q, _h in ours for n, v in vals.items()}
        for tm in d["metrics"]:
            name = aliases[_num(tm["alias"])][0]
            want = values[(_num(tm["timestamp"]), name)]
            got = _num(tm["value"]) if isinstance(want, int) else tm["value"]
            assert got == pytest.approx(want), name
            compared += 1
    assert compared >= 3 * len(aliases) // 2
    assert sub.bad == []


def _start_node(env: dict[str, str], port: int, samples: int, t0: int) -> subprocess.Popen[str]:
    args = [f"mqtt://127.0.0.1:{port}", "ent-1", "tahu-node", "press-1", str(samples), str(t0)]
    return subprocess.Popen(
        [env["IIOT_NODE"], str(_HERE / "edge_node.js"), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait(cond: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_tahu_edge_node_lands_in_our_gateway(
    tmp_path: Path, mosquitto: Mosquitto, victoria: VictoriaMetrics, tahu: dict[str, str]
) -> None:
    data = tmp_path / "gw"
    data.mkdir()
    reg = Registry(f"sqlite:///{data / 'registry.db'}")
    reg.add_enterprise("ent-1", "Test Works", "130102", "C30")
    reg.add_agent("ent-1", "tahu-node", None)
    reg.close()
    gw = Gateway(gateway_config(tmp_path, mosquitto, victoria), serve_api=False)
    gw.start()
    n = 20
    t0 = int(time.time() * 1000) - (n - 1) * 1000
    node = _start_node(tahu, mosquitto.port, n, t0)
    try:
        assert node.stdout is not None and node.stdin is not None
        assert node.stdout.readline().strip() == "born", node.stderr

        def registered() -> bool:
            view = gw.registry.get_device("ent-1", "press-1")
            return view is not None and view["agent"] == "tahu-node"

        _wait(registered, 20, "the Tahu node's device registered by its DBIRTH")
        node.stdin.write("data\n")
        node.stdin.flush()
        assert node.stdout.readline().strip() == "published"
        _wait(
            lambda: (
                len(series_by_name(victoria).get("telemetry_count", [{}])[0].get("values", [])) == n
            ),
            20,
            "the Tahu node's samples in victoria-metrics",
        )
        view = gw.registry.get_device("ent-1", "press-1")
        assert view is not None and view["online"] and view["not_in_ledger"]
        overall = compute_ratios(gw.registry, None)["overall"]
        assert overall["online"] == 1 and overall["total"] >= 1, overall
        node.stdin.write("stop\n")
        node.stdin.flush()
        node.wait(10)
        _wait(
            lambda: not gw.registry.get_device("ent-1", "press-1")["online"],
            10,
            "the device offline after the Tahu node's NDEATH",
        )
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(10)
        gw.stop()
    series = series_by_name(victoria)
    names = ("telemetry_temp", "telemetry_speed", "telemetry_count")
    assert all(len(series[name]) == 1 for name in names), "one series per point"
    got = {
        name: sorted(zip(s[0]["timestamps"], s[0]["values"], strict=True))
        for name in names
        for s in [series[name]]
    }
    assert got["telemetry_temp"] == [(t0 + i * 1000, 800.0 + i) for i in range(n)]
    assert got["telemetry_speed"] == [(t0 + i * 1000, -i) for i in range(n)]
    assert got["telemetry_count"] == [(t0 + i * 1000, 4_000_000_000 + i) for i in range(n)]
    assert series["telemetry_temp"][0]["metric"]["agent"] == "tahu-node"


def _tahu_encode(env: dict[str, str], payload: dict[str, Any]) -> bytes:
    res = subprocess.run(
        [env["IIOT_NODE"], str(_HERE / "encode.js")],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    return base64.b64decode(res.stdout)


async def test_a_tahu_encoded_dcmd_is_written(
    tmp_path: Path, mosquitto: Mosquitto, tahu: dict[str, str]
) -> None:
    dev = SimDevice(load_profiles()[_PROFILE], device_id="kiln-1", seed=1)
    sim = ModbusSimServer({1: dev}, port=0)
    await sim.start()
    cfg = agent_dict(tmp_path, mosquitto.port, [modbus_device("kiln-1", _PROFILE, sim.port)])
    cfg["mqtt"]["codec"] = "sparkplug"
    agent = Agent(parse_config(cfg))
    host = _Client(mosquitto.port, "host", "unused")
    host.subscribe("iiot/v1/ent-1/agent-1/kiln-1/result")
    now = int(time.time() * 1000)
    command = {
        "timestamp": now,
        "metrics": [
            {"name": "burning_zone_temp_setpoint", "type": "Double", "value": 1300.5},
            {"name": "kiln_speed_setpoint", "type": "Double", "value": 3.25, "timestamp": now},
        ],
    }
    payload = await asyncio.to_thread(_tahu_encode, tahu, command)
    with SpSubscriber(mosquitto.port) as sub:
        await agent.start()
        try:
            await wait_for(lambda: bool(sub.of("DDATA")), 15, "DDATA")
            host.publish("spBv1.0/ent-1/DCMD/agent-1/kiln-1", payload)
            await wait_for(lambda: len(host.messages) >= 2, 10, "two WriteResults")
        finally:
            await agent.stop()
            host.c.disconnect()
            host.c.loop_stop()
    client = AsyncModbusTcpClient("127.0.0.1", port=sim.port)
    await client.connect()
    try:
        rr = await client.read_holding_registers(0, count=2, device_id=1)
    finally:
        client.close()
        await sim.stop()

    results = [WriteResult.model_validate_json(p) for _, p in host.messages]
    assert [r.status for r in results] == [WriteStatus.OK, WriteStatus.OK], results
    assert {r.value for r in results} == {1300.5, 3.25}
    assert rr.registers == [13005, 325]  # what a Modbus client reads after the writes

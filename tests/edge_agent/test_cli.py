"""``iiot agent run`` as a user runs it: bad configs, SIGKILL during an outage, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from device_profiles.loader import load_profiles
from iiot_common.localservers import Mosquitto
from protocols.mqtt.contract import Birth, Will
from simulators.device import SimDevice
from simulators.modbus_server import ModbusSimServer
from tests.edge_agent.helpers import PersistentMosquitto, Subscriber, agent_dict, modbus_device
from tests.waiting import wait_for

_IIOT = [str(Path(sys.executable).parent / "iiot")]


def _run_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_IIOT, "agent", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


_BAD_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "unknown profile": (
        {"devices": [modbus_device("boiler-3", "no-such-profile", 1502)]},
        "device 'boiler-3': profile 'no-such-profile' not found",
    ),
    "protocol mismatch": (
        {
            "devices": [
                {
                    "id": "kiln-9",
                    "profile": "kiln-rotary-cement",
                    "opcua": {"endpoint": "opc.tcp://127.0.0.1:4840"},
                }
            ]
        },
        "device 'kiln-9': profile 'kiln-rotary-cement' speaks modbus",
    ),
    "duplicate id": (
        {
            "devices": [
                modbus_device("kiln-1", "kiln-rotary-cement", 1502),
                modbus_device("kiln-1", "kiln-rotary-cement", 1503),
            ]
        },
        "device 'kiln-1': duplicate device id",
    ),
    "unknown key": (
        {"devices": [modbus_device("kiln-2", "kiln-rotary-cement", 1502, pol_interval=3)]},
        "device 'kiln-2': pol_interval: unknown key",
    ),
    "unknown point": (
        {"devices": [modbus_device("kiln-4", "kiln-rotary-cement", 1502, points=["nope"])]},
        "device 'kiln-4': point 'nope' is not in profile 'kiln-rotary-cement'",
    ),
    "bad identifier": (
        {"agent_id": "agent one"},
        "agent_id: 'agent one' must match",
    ),
    "backoff bounds reversed": (
        {"mqtt": {"url": "mqtt://127.0.0.1:1883", "reconnect_min": 60, "reconnect_max": 5}},
        "reconnect_min (60.0) is above reconnect_max (5.0)",
    ),
    "batch with sparkplug": (
        {"mqtt": {"url": "mqtt://127.0.0.1:1883", "codec": "sparkplug", "batch": True}},
        "batch works with the json codec only",
    ),
    "credentials in the broker url": (
        {"mqtt": {"url": "mqtt://agent:S3cretPw@127.0.0.1:1883"}},
        "url must not carry credentials; use username and password_file",
    ),
    "unreadable password file": (
        {"mqtt": {"url": "mqtt://127.0.0.1:1883", "password_file": "/"}},
        "mqtt.password_file: cannot read /",
    ),
}


@pytest.mark.parametrize("case", sorted(_BAD_CASES))
def test_bad_config_exits_2_naming_the_device(tmp_path: Path, case: str) -> None:
    override, expected = _BAD_CASES[case]
    cfg = {**agent_dict(tmp_path, 1883, []), **override}
    proc = _run_check(_write(tmp_path / "agent.yaml", cfg))
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "S3cretPw" not in proc.stderr + proc.stdout


def test_config_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_bytes("agent_id: a1\nenterprise: 石家庄\n".encode("gbk"))
    proc = _run_check(cfg)
    assert proc.returncode == 2, proc.stderr
    assert "not UTF-8" in proc.stderr


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    cfg = agent_dict(
        tmp_path,
        1883,
        [
            modbus_device("a", "no-such-profile", 1502),
            modbus_device("b", "kiln-rotary-cement", 1502, colour="red"),
        ],
    )
    proc = _run_check(_write(tmp_path / "agent.yaml", cfg))
    assert proc.returncode == 2
    assert "device 'a': profile 'no-such-profile' not found" in proc.stderr
    assert "device 'b': colour: unknown key" in proc.stderr


def test_bad_profile_folder_exits_2_naming_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "my-profiles"
    folder.mkdir()
    (folder / "broken.yaml").write_text(
        "id: broken\nname: B\nname_zh: B\nfamily: kiln\ncategory: high_energy_process\n"
        "protocol: modbus\npoints:\n  - {name: t, type: float32, modbus: {table: input}}\n"
    )
    cfg = {**agent_dict(tmp_path, 1883, []), "profiles": [str(folder)]}
    proc = _run_check(_write(tmp_path / "agent.yaml", cfg))
    assert proc.returncode == 2
    assert "broken.yaml" in proc.stderr and "point 't'" in proc.stderr


def _spooled_last_seq(db: Path, device: str) -> int:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (f"seq:{device}",)).fetchone()
    return int(row[0])


def _spawn(
    config: Path, stderr: Any, env: dict[str, str] | None = None, opts: list[str] | None = None
) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [*_IIOT, *(opts or []), "agent", "run", "-c", str(config)]
    return subprocess.Popen(cmd, stderr=stderr, env=full_env)


async def _wait_proc(proc: subprocess.Popen[bytes], within: float) -> int:
    for _ in range(int(within / 0.05)):
        if proc.poll() is not None:
            return proc.returncode
        await asyncio.sleep(0.05)
    raise AssertionError("agent did not exit")


async def test_sigkill_while_broker_down_loses_nothing(tmp_path: Path) -> None:
    profiles = load_profiles()
    dev = SimDevice(profiles["kiln-rotary-cement"], device_id="kiln-1", seed=5)
    sim = ModbusSimServer({1: dev}, port=0)
    await sim.start()
    bdir = tmp_path / "broker"
    bdir.mkdir()
    broker = PersistentMosquitto(bdir).start()
    devices = [modbus_device("kiln-1", "kiln-rotary-cement", sim.port, interval=0.1)]
    config = _write(tmp_path / "agent.yaml", agent_dict(tmp_path, broker.port, devices))
    db = tmp_path / "agent-data" / "spool.db"
    log1 = (tmp_path / "agent1.log").open("wb")
    log2 = (tmp_path / "agent2.log").open("wb")
    sub = Subscriber(broker.port, client_id="kill-sub", clean=False).start()
    agent = _spawn(config, log1)
    agent2: subprocess.Popen[bytes] | None = None
    try:
        await wait_for(lambda: len(sub.samples("kiln-1")) >= 5, 20, "first samples")
        broker.stop()
        # Polls go to the spool only: a few more than the subscriber has seen.
        await wait_for(
            lambda: _spooled_last_seq(db, "kiln-1") > max(s for s, _ in sub.samples("kiln-1")) + 5,
            20,
            "samples spooled while the broker is down",
        )
        agent.send_signal(signal.SIGKILL)
        await _wait_proc(agent, 10)
        last_spooled = _spooled_last_seq(db, "kiln-1")
        seen = max(s for s, _ in sub.samples("kiln-1"))
        assert last_spooled > seen + 5
        agent2 = _spawn(config, log2)
        await asyncio.sleep(0.5)
        broker.start()
        await wait_for(
            lambda: {s for s, _ in sub.samples("kiln-1")} >= set(range(1, last_spooled + 1)),
            20,
            "every spooled sample after the restart",
        )
        agent2.send_signal(signal.SIGTERM)
        assert await _wait_proc(agent2, 15) == 0
        await wait_for(lambda: isinstance(sub.on("/agent")[-1].decoded, Will), 5, "offline msg")
    finally:
        for p in (agent, agent2):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)
        sub.stop()
        broker.stop()
        await sim.stop()
        log1.close()
        log2.close()
    assert sub.bad == []
    # A replay may repeat a sample (same seq, same ts) but a seq never names two samples.
    by_seq: dict[int, set[int]] = {}
    for seq, sample in sub.samples("kiln-1"):
        by_seq.setdefault(seq, set()).add(sample.ts)
    assert all(len(ts) == 1 for ts in by_seq.values())
    logs = (tmp_path / "agent2.log").read_text()
    assert "agent stopped" in logs


async def test_will_is_published_when_the_agent_dies(tmp_path: Path, mosquitto: Mosquitto) -> None:
    profiles = load_profiles()
    sim = ModbusSimServer(
        {1: SimDevice(profiles["kiln-rotary-cement"], device_id="k", seed=1)}, port=0
    )
    await sim.start()
    devices = [modbus_device("kiln-1", "kiln-rotary-cement", sim.port, interval=0.1)]
    cfg = agent_dict(tmp_path, mosquitto.port, devices)
    cfg["mqtt"]["username"] = "agent-1"
    config = _write(tmp_path / "agent.yaml", cfg)
    sub = Subscriber(mosquitto.port).start()
    log = (tmp_path / "agent.log").open("wb")
    # The password comes from the environment and must never reach the log.
    agent = _spawn(config, log, {"IIOT_MQTT_PASSWORD": "s3cret-pw"}, ["--log-level", "debug"])
    try:
        await wait_for(lambda: len(sub.samples("kiln-1")) >= 2, 20, "samples")
        agent.send_signal(signal.SIGKILL)
        await _wait_proc(agent, 10)
        await wait_for(lambda: isinstance(sub.on("/agent")[-1].decoded, Will), 10, "the will")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(5)
        sub.stop()
        await sim.stop()
        log.close()
    assert "s3cret-pw" not in (tmp_path / "agent.log").read_text()
    assert "mqtt connected" in (tmp_path / "agent.log").read_text()
    births = [m.decoded for m in sub.on("/agent") if isinstance(m.decoded, Birth)]
    will = sub.on("/agent")[-1]
    assert isinstance(will.decoded, Will) and will.decoded.bdseq == births[-1].bdseq


def test_example_config_checks_clean() -> None:
    example = Path(__file__).resolve().parents[2] / "edge_agent" / "agent.example.yaml"
    proc = subprocess.run(
        [*_IIOT, "agent", "check", "-c", str(example)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "4 enabled device(s)" in proc.stdout


def test_busy_metrics_port_is_a_clear_start_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = {**agent_dict(tmp_path, 1883, []), "metrics": {"port": port}}
        proc = _run_check(_write(tmp_path / "agent.yaml", cfg))
    assert proc.returncode == 1
    assert f"agent cannot start: metrics endpoint 127.0.0.1:{port}" in proc.stderr


async def test_second_agent_on_the_same_data_dir_refuses_to_start(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = _write(tmp_path / "agent.yaml", agent_dict(tmp_path, mosquitto.port, []))
    log1 = (tmp_path / "agent1.log").open("wb")
    first = _spawn(config, log1)
    try:
        await wait_for(
            lambda: "agent started" in (tmp_path / "agent1.log").read_text(), 20, "first agent"
        )
        second = await asyncio.to_thread(_run_check, config)
        assert second.returncode == 2, second.stderr
        assert f"in use by pid {first.pid}" in second.stderr
        assert str(tmp_path / "agent-data") in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first agent is untouched
        first.send_signal(signal.SIGTERM)
        assert await _wait_proc(first, 15) == 0
        # Once the first has stopped the data directory is free again.
        third = _spawn(config, log1)
        try:
            await wait_for(
                lambda: (tmp_path / "agent1.log").read_text().count("agent started") == 2,
                20,
                "a new agent after the first stopped",
            )
        finally:
            third.send_signal(signal.SIGTERM)
            assert await _wait_proc(third, 15) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(5)
        log1.close()

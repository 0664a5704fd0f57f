"""The size limit of an agent-level batch message holds for the whole payload."""

from __future__ import annotations

from pathlib import Path

from edge_agent.config import parse_config
from edge_agent.metrics import AgentMetrics
from edge_agent.publisher import Publisher
from edge_agent.spool import Spool
from iiot_common.localservers import Mosquitto
from protocols.mqtt.codec import JSON_CODEC
from protocols.mqtt.contract import BatchMessage
from tests.edge_agent.helpers import Subscriber, agent_dict
from tests.waiting import wait_for

_LIMIT = 1024  # the smallest batch_bytes the config allows


async def test_batch_messages_stay_within_batch_bytes_wrappers_included(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    # Long device ids and one small sample each: the per-device wrappers
    # ('"<device>":{"seq":..,"samples":[..]}') weigh more than the samples themselves.
    devices = [f"device-with-a-rather-long-identifier-{i:03d}" for i in range(60)]
    cfg = agent_dict(tmp_path, mosquitto.port, [])
    cfg["mqtt"]["batch"] = True
    cfg["spool"] = {"batch_bytes": _LIMIT}
    config = parse_config(cfg).config
    spool = Spool(tmp_path / "spool.db")
    for i, dev in enumerate(devices):
        spool.append(dev, 1_700_000_000_000 + i, JSON_CODEC.encode_sample(1, {"t": 20.5}, {}))
    publisher = Publisher(config, spool, AgentMetrics(), devices=[], version="test")
    sub = Subscriber(mosquitto.port, client_id="batch-limit-sub").start()
    sample = JSON_CODEC.encode_sample(1, {"t": 20.5}, {})

    def received() -> list[str]:
        return [d for m in sub.on("/batch") if isinstance(m.decoded, BatchMessage)
                for d in m.decoded.devices]  # fmt: skip

    try:
        await publisher.start()
        await wait_for(lambda: spool.depth == 0, 15, "every sample acknowledged")
        await wait_for(lambda: len(received()) >= len(devices), 5, "every batch received")
        await publisher.stop()
        batches = sub.on("/batch")
    finally:
        sub.stop()
        spool.close()
    sizes = [len(m.payload) for m in batches]
    assert max(sizes) <= _LIMIT, sizes
    assert sorted(received()) == sorted(devices)  # each device's sample once
    # The limit is used, not just kept: only the last message may be small.
    part = len(f'"{devices[0]}":{{"seq":1,"samples":[{sample}]}}')
    assert all(s > _LIMIT - part - 1 for s in sizes[:-1]), sizes
    assert sub.bad == []


async def test_a_device_s_messages_stay_within_batch_bytes_with_non_ascii_values(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    # One device's data messages ('{"seq":..,"samples":[..]}'), the default shape; each
    # sample carries a text of Chinese characters (three bytes each in UTF-8).
    cfg = agent_dict(tmp_path, mosquitto.port, [])
    cfg["spool"] = {"batch_bytes": _LIMIT}
    config = parse_config(cfg).config
    spool = Spool(tmp_path / "spool.db")
    body = JSON_CODEC.encode_sample(1, {"state": "运行正常" * 5, "t": 20.5}, {})
    for i in range(40):
        spool.append("kiln-1", 1_700_000_000_000 + i, body)
    publisher = Publisher(config, spool, AgentMetrics(), devices=[], version="test")
    sub = Subscriber(mosquitto.port, client_id="data-limit-sub").start()
    try:
        await publisher.start()
        await wait_for(lambda: spool.depth == 0, 15, "every sample acknowledged")
        await wait_for(lambda: len(sub.samples("kiln-1")) >= 40, 5, "every sample received")
        await publisher.stop()
        sizes = [len(m.payload) for m in sub.on("/kiln-1/data")]
    finally:
        sub.stop()
        spool.close()
    assert sizes and max(sizes) <= _LIMIT, sizes
    assert len(sizes) > 1 and all(s > _LIMIT - len(body.encode()) - 40 for s in sizes[:-1])

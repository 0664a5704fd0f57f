"""Test helpers for the edge agent: a plain paho subscriber and config builders."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from iiot_common.localservers import Mosquitto
from protocols.mqtt.contract import (
    BatchMessage,
    DataMessage,
    Payload,
    decode_payload,
    parse_topic,
)
from tests.waiting import wait_for as wait_for  # for tests that import it from here

__all__ = [
    "PersistentMosquitto",
    "Received",
    "Subscriber",
    "SubscriberLifecycle",
    "agent_dict",
    "modbus_device",
    "wait_for",
]


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    decoded: Payload


class SubscriberLifecycle:
    """Connect, wait for the SUBACK, and disconnect a test subscriber's paho client."""

    port: int
    client: mqtt.Client
    _subscribed: threading.Event

    def start(self) -> Self:
        self.client.connect("127.0.0.1", self.port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(5):
            raise TimeoutError("subscriber did not get its SUBACK")
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Subscriber(SubscriberLifecycle):
    """A plain paho subscriber on ``iiot/v1/#``; every message is decoded with the contract."""

    port: int
    client_id: str = "test-subscriber"
    clean: bool = True
    messages: list[Received] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=self.clean
        )
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()

    def _on_connect(self, c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        c.subscribe("iiot/v1/#", qos=1)

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            decoded = decode_payload(parse_topic(msg.topic), bytes(msg.payload))
        except Exception as exc:  # recorded; the test asserts there were none
            with self._lock:
                self.bad.append(f"{msg.topic}: {exc}")
            return
        with self._lock:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), decoded))

    def on(self, suffix: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def data(self, device: str) -> list[DataMessage]:
        """``device``'s data messages, on its own topic or as its part of batch messages."""
        own = f"/{device}/data"
        with self._lock:
            received = list(self.messages)
        out: list[DataMessage] = []
        for m in received:
            if isinstance(m.decoded, DataMessage) and m.topic.endswith(own):
                out.append(m.decoded)
            elif isinstance(m.decoded, BatchMessage) and device in m.decoded.devices:
                out.append(m.decoded.devices[device])
        return out

    def samples(self, device: str) -> list[tuple[int, Any]]:
        """(seq, sample) of every sample received for ``device``, in arrival order."""
        out = []
        for msg in self.data(device):
            for i, s in enumerate(msg.samples):
                out.append((msg.seq + i, s))
        return out


def modbus_device(
    dev_id: str, profile: str, port: int, unit: int = 1, interval: float = 0.2, **extra: Any
) -> dict[str, Any]:
    return {
        "id": dev_id,
        "profile": profile,
        "poll_interval": interval,
        "modbus": {"host": "127.0.0.1", "port": port, "unit": unit, "timeout": 0.5, "retries": 0},
        **extra,
    }


def agent_dict(
    tmp: Path, mqtt_port: int, devices: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {
        "agent_id": "agent-1",
        "enterprise": "ent-1",
        "data_dir": str(tmp / "agent-data"),
        "mqtt": {
            "url": f"mqtt://127.0.0.1:{mqtt_port}",
            "reconnect_min": 0.2,
            "reconnect_max": 1.0,
        },
        "devices": devices,
        **extra,
    }


class PersistentMosquitto(Mosquitto):
    """Mosquitto that keeps sessions across a restart, so a test subscriber misses nothing."""

    def _write_conf(self) -> None:
        super()._write_conf()
        text = self.conf.read_text().replace(
            "persistence false",
            f"persistence true\npersistence_location {self.workdir}/\nautosave_interval 0",
        )
        self.conf.write_text(text)

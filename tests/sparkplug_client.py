"""A plain paho client on ``spBv1.0/#`` that decodes every Sparkplug B message it sees."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocols.mqtt.sparkplug.payload import SpTopic, parse_payload, parse_sp_topic
from tests.edge_agent.helpers import SubscriberLifecycle

__all__ = ["SpMessage", "SpSubscriber"]


@dataclass
class SpMessage:
    topic: SpTopic
    payload: Any  # the decoded protobuf Payload
    raw: bytes

    def metric(self, name: str) -> Any:
        for m in self.payload.metrics:
            if m.name == name:
                return m
        raise KeyError(name)


@dataclass
class SpSubscriber(SubscriberLifecycle):
    """Subscribes to ``spBv1.0/#``; keeps messages in arrival order."""

    port: int
    client_id: str = "sp-subscriber"
    clean: bool = True
    username: str | None = None
    password: str | None = None
    messages: list[SpMessage] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=self.clean
        )
        if self.username:
            self.client.username_pw_set(self.username, self.password)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe("spBv1.0/#", qos=1)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        raw = bytes(msg.payload)
        try:
            m = SpMessage(parse_sp_topic(msg.topic), parse_payload(raw), raw)
        except Exception as exc:  # recorded; tests assert there were none
            with self._lock:
                self.bad.append(f"{msg.topic}: {exc}")
            return
        with self._lock:
            self.messages.append(m)

    def of(self, kind: str, device: str | None = None) -> list[SpMessage]:
        with self._lock:
            return [
                m
                for m in self.messages
                if m.topic.type.value == kind and (device is None or m.topic.device == device)
            ]

    def all(self) -> list[SpMessage]:
        with self._lock:
            return list(self.messages)

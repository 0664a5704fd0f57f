"""The MQTT uplink contract (topics, payload models, codec)."""

from protocols.mqtt.contract import *  # noqa: F403
from protocols.mqtt.contract import __all__ as __all__

"""Readiness of the gateway: is it able to take work now, and if not, why not.

Liveness is the HTTP server answering at all (``/health/live``). Readiness
(``/health/ready``) fails while a dependency the work needs refuses or fails: the broker
has not accepted the ingest's connection or subscription (for instance "Not authorized"
for wrong credentials), the database writer has been failing longer than
``health.writer_failing_for``, or the oldest line waiting in the outbox is older than
``health.outbox_backlog_age``.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from gateway.config import HealthConfig

__all__ = ["BrokerWatch", "Readiness"]


class _Writer(Protocol):
    def failing_for(self) -> float: ...

    @property
    def last_error(self) -> str | None: ...


class _Outbox(Protocol):
    def oldest_age(self) -> float | None: ...


class BrokerWatch:
    """What the broker last said to the ingest's MQTT client: refused, connected, subscribed.

    Installed on the client's callbacks (each still calls the ingest's own) before the
    client connects.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.refused: str | None = None
        self.subscribe_refused: str | None = None
        self.connected = False
        self.subscribed = False

    def attach(self, client: Any) -> None:
        """Wrap a paho ``Client``'s connect, subscribe and disconnect callbacks."""
        on_connect, on_subscribe, on_disconnect = (
            client.on_connect,
            client.on_subscribe,
            client.on_disconnect,
        )

        def connect(c: Any, ud: Any, flags: Any, reason: Any, props: Any) -> None:
            with self._lock:
                self.connected = not reason.is_failure
                self.subscribed = False
                self.refused = str(reason) if reason.is_failure else None
            if on_connect is not None:
                on_connect(c, ud, flags, reason, props)

        def subscribe(c: Any, ud: Any, mid: int, reasons: list[Any], props: Any) -> None:
            failed = [str(r) for r in reasons if r.is_failure]
            with self._lock:
                self.subscribed = not failed
                self.subscribe_refused = ", ".join(failed) or None
            if on_subscribe is not None:
                on_subscribe(c, ud, mid, reasons, props)

        def disconnect(c: Any, ud: Any, flags: Any, reason: Any, props: Any) -> None:
            with self._lock:
                self.connected = self.subscribed = False
            if on_disconnect is not None:
                on_disconnect(c, ud, flags, reason, props)

        client.on_connect = connect
        client.on_subscribe = subscribe
        client.on_disconnect = disconnect

    def reasons(self) -> list[str]:
        with self._lock:
            if self.refused is not None:
                return [f"broker refused the ingest's connection: {self.refused}"]
            if self.subscribe_refused is not None:
                return [f"broker refused the ingest's subscription: {self.subscribe_refused}"]
            if not self.connected:
                return ["ingest is not connected to the broker"]
            if not self.subscribed:
                return ["ingest is not subscribed at the broker yet"]
            return []


class Readiness:
    """The reasons the gateway is not ready; none means ready."""

    def __init__(
        self,
        config: HealthConfig,
        *,
        broker: BrokerWatch | None = None,
        writer: _Writer | None = None,
        outbox: _Outbox | None = None,
    ) -> None:
        self.config = config
        self.broker = broker
        self.writer = writer
        self.outbox = outbox

    def reasons(self) -> list[str]:
        out: list[str] = []
        if self.broker is not None:
            out += self.broker.reasons()
        if self.writer is not None:
            failing = self.writer.failing_for()
            if failing > self.config.writer_failing_for:
                out.append(
                    f"database writer failing for {failing:.0f} s "
                    f"(threshold {self.config.writer_failing_for:g} s): {self.writer.last_error}"
                )
            # Without a writer the outbox is the store: its lines are meant to stay.
            try:
                age = self.outbox.oldest_age() if self.outbox is not None else None
            except Exception as exc:  # closed while stopping, or the disk failing
                out.append(f"outbox unavailable: {exc}")
                age = None
            if age is not None and age > self.config.outbox_backlog_age:
                out.append(
                    f"oldest outbox line waiting {age:.0f} s for the database "
                    f"(threshold {self.config.outbox_backlog_age:g} s)"
                )
        return out

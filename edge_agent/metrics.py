"""The agent's self-metrics (Prometheus), on its own registry and local HTTP endpoint.

Per-device series are few (a handful of lines per device), since each line is formatted
on every scrape; distributions (poll duration, lag) are agent-wide. The endpoint itself
is ``metrics_http.MetricsServer``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric

__all__ = ["AgentMetrics", "DriverEvents", "driver_events"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
# The driver counters (fields of a driver's ``stats`` dataclass) that count trouble, as
# iiot_agent_driver_events_total's events: plain counts, and per-code counts (a dict, one
# event per code). Ordinary traffic (requests, polls) is on iiot_agent_polls already.
_EVENT_FIELDS = (
    "timeouts", "connect_errors", "decode_errors", "splits", "sessions_lost", "overflows",
    "dropped_batches", "late_items_deleted", "late_items_left",
)  # fmt: skip
_EVENT_CODES = ("exceptions", "bad_status")
_POLL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class AgentMetrics:
    """Every metric the agent exports; one instance per agent, never the global registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.polls = Counter(
            "iiot_agent_polls", "Polls by device and result (ok, or an error reason).",
            ["device", "result"], registry=r,
        )  # fmt: skip
        self.poll_duration = Histogram(
            "iiot_agent_poll_duration_seconds", "Time one poll took (all devices).",
            buckets=_POLL_BUCKETS, registry=r,
        )  # fmt: skip
        self.poll_lag = Histogram(
            "iiot_agent_poll_lag_seconds", "How late a poll started against its schedule.",
            buckets=_POLL_BUCKETS, registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "iiot_agent_errors", "Errors by device and reason (whole polls and single points).",
            ["device", "reason"], registry=r,
        )  # fmt: skip
        self.skipped_ticks = Counter(
            "iiot_agent_skipped_ticks", "Scheduled polls skipped because a poll overran.",
            ["device"], registry=r,
        )  # fmt: skip
        self.spool_depth = Gauge(
            "iiot_agent_spool_depth", "Samples waiting in the spool.", registry=r
        )
        self.spool_bytes = Gauge(
            "iiot_agent_spool_bytes", "Approximate bytes waiting in the spool.", registry=r
        )
        self.spool_disk_bytes = Gauge(
            "iiot_agent_spool_disk_bytes",
            "Bytes the spool's files take on disk (database and write-ahead log).",
            registry=r,
        )
        self.spool_dropped = Counter(
            "iiot_agent_spool_dropped", "Samples dropped (oldest first) by the spool cap.",
            registry=r,
        )  # fmt: skip
        self.spool_commit_errors = Counter(
            "iiot_agent_spool_commit_errors", "Spool group commits that failed (retried).",
            registry=r,
        )  # fmt: skip
        self.spool_inline_checkpoints = Counter(
            "iiot_agent_spool_inline_checkpoints",
            "Times a spool commit cut the write-ahead log back itself, the checkpoint "
            "worker having fallen behind (a starved CPU).",
            registry=r,
        )
        self.sparkplug_rebirths = Counter(
            "iiot_agent_sparkplug_rebirths",
            "Sparkplug B rebirths sent on a host application's NCMD request.",
            registry=r,
        )
        self.published_messages = Counter(
            "iiot_agent_published_messages", "MQTT messages acknowledged by the broker, by kind.",
            ["kind"], registry=r,
        )  # fmt: skip
        self.published_samples = Counter(
            "iiot_agent_published_samples", "Samples acknowledged by the broker.", registry=r
        )
        self.publish_latency = Histogram(
            "iiot_agent_publish_latency_seconds", "Sample timestamp to broker PUBACK.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.mqtt_connected = Gauge(
            "iiot_agent_mqtt_connected", "1 while connected to the broker.", registry=r
        )
        self.mqtt_connects = Counter(
            "iiot_agent_mqtt_connects", "MQTT connection attempts by result.", ["result"],
            registry=r,
        )  # fmt: skip
        self.device_online = Gauge(
            "iiot_agent_device_online", "1 while the device answers.", ["device"], registry=r
        )
        self.loop_lag = Gauge(
            "iiot_agent_loop_lag_seconds",
            "How late the agent's event loop ran a timer (0 while it keeps up).",
            registry=r,
        )
        self.suppressed_samples = Counter(
            "iiot_agent_suppressed_samples", "Samples not sent (report on change, unchanged).",
            ["device"], registry=r,
        )  # fmt: skip

    def forget_device(self, device: str) -> None:
        """Drop every series of ``device`` (removed from the config): a scrape no longer
        shows its last values as if it were still polled."""
        for metric in self.all():
            names = list(getattr(metric, "_labelnames", ()))
            if "device" not in names:
                continue
            seen: set[tuple[str, ...]] = set()
            for family in metric.collect():
                for sample in family.samples:
                    if sample.labels.get("device") == device:
                        seen.add(tuple(sample.labels[n] for n in names))
            for values in seen:
                metric.remove(*values)

    def all(self) -> list[Any]:
        """Every metric object above, in registration order."""
        return [v for v in vars(self).values() if isinstance(v, Counter | Gauge | Histogram)]


def driver_events(stats: object) -> dict[str, int]:
    """A driver's trouble counters by event, non-zero only: ``timeouts``, … and one per
    code of a per-code count (``exceptions:2``, ``bad_status:BadNodeIdUnknown``)."""
    if stats is None:
        return {}
    out: dict[str, int] = {}
    for name in _EVENT_FIELDS:
        value = getattr(stats, name, 0)
        if type(value) is int and value:
            out[name] = value
    for name in _EVENT_CODES:
        codes = getattr(stats, name, None)
        if isinstance(codes, dict):
            for key, n in codes.items():
                if type(n) is int and n:
                    out[f"{name}:{key}"] = n
    return out


class DriverEvents:
    """``iiot_agent_driver_events_total{device,event}``: what the drivers counted going
    wrong below a poll's result (timeouts, Modbus exception codes, OPC UA status codes,
    sessions lost, server queue overflows, monitored items left behind).

    Read at scrape time from ``source`` (device id, events); a device with nothing to
    report adds no line. ``lines`` gives the exposition one line at a time, so that the
    agent's /metrics can yield to the pollers between lines; ``collect`` serves anything
    else that reads the registry.
    """

    NAME = "iiot_agent_driver_events"
    HELP = "Trouble the device drivers counted, by device and event (see edge_agent/README)."

    def __init__(self, source: Callable[[], Iterable[tuple[str, Mapping[str, int]]]]) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return []  # no fixed names: registering must not collect

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.NAME, self.HELP, labels=["device", "event"])
        for device, events in self._source():
            for event, n in sorted(events.items()):
                family.add_metric([device, event], n)
        yield family

    def lines(self, escape: Callable[[str], str], number: Callable[[float], str]) -> Iterator[str]:
        """The family in the text format, as prometheus_client writes it, lazily
        (``escape``: a label value's escaping; ``number``: a sample value's text)."""
        name = self.NAME + "_total"
        yield f"# HELP {name} {self.HELP}\n# TYPE {name} counter\n"
        for device, events in self._source():
            if not events:
                continue
            head = f'{name}{{device="{escape(device)}",event="'
            for event, n in sorted(events.items()):
                yield f'{head}{escape(event)}"}} {number(n)}\n'

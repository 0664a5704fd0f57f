"""Prometheus metrics of the gateway's data path, held in one CollectorRegistry.

Each ``Gateway`` owns its registry so several instances can run in one process (tests,
the demo); ``/metrics`` serves that registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["DataPathMetrics"]


class DataPathMetrics:
    """Counters and gauges for ingest, outbox and writer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "iiot_gateway_messages_received_total", "MQTT messages received.", registry=r
        )
        self.acked = Counter(
            "iiot_gateway_messages_acked_total",
            "MQTT messages acknowledged to the broker (after commit or reject).",
            registry=r,
        )
        self.rejected = Counter(
            "iiot_gateway_rejected_total",
            "MQTT messages rejected, by reason (a batch's or birth's device parts each).",
            ["reason"],
            registry=r,
        )
        self.samples = Counter(
            "iiot_gateway_samples_total", "Samples accepted into the outbox.", registry=r
        )
        self.duplicates = Counter(
            "iiot_gateway_duplicate_samples_total",
            "Samples dropped as replays of a sample already committed.",
            registry=r,
        )
        self.points = Counter(
            "iiot_gateway_points_total", "Point values accepted into the outbox.", registry=r
        )
        self.point_errors = Counter(
            "iiot_gateway_point_errors_total",
            "Point errors reported by agents (not written as fields).",
            registry=r,
        )
        self.dropped_values = Counter(
            "iiot_gateway_dropped_values_total",
            "Point values dropped from accepted samples (the rest is written), by reason.",
            ["reason"],
            registry=r,
        )
        self.sequence_gaps = Counter(
            "iiot_gateway_sequence_gaps_total",
            "Breaks in a device's sample sequence numbers (samples the agent never sent).",
            registry=r,
        )
        self.missed_samples = Counter(
            "iiot_gateway_missed_samples_total",
            "Samples missing in sequence gaps, summed over all devices.",
            registry=r,
        )
        self.batches = Counter(
            "iiot_gateway_ingest_batches_total", "Ingest transactions committed.", registry=r
        )
        self.batch_size = Histogram(
            "iiot_gateway_ingest_batch_messages",
            "Messages per ingest transaction.",
            buckets=(1, 5, 10, 50, 100, 500, 1000, 5000),
            registry=r,
        )
        self.ingest_errors = Counter(
            "iiot_gateway_ingest_errors_total",
            "Ingest batches that failed to commit (messages left unacknowledged).",
            registry=r,
        )
        self.sink_errors = Counter(
            "iiot_gateway_sink_errors_total",
            "Exceptions raised by the registry while handling an accepted message.",
            registry=r,
        )
        self.sparkplug_rebirths = Counter(
            "iiot_gateway_sparkplug_rebirth_requests_total",
            "Rebirth requests (NCMD) sent to Sparkplug edge nodes.",
            registry=r,
        )
        self.sparkplug_seq_gaps = Counter(
            "iiot_gateway_sparkplug_seq_gaps_total",
            "Gaps in a Sparkplug edge node's seq: numbers never received (a message up to 64 "
            "late is not one), by edge node.",
            ["node"],
            registry=r,
        )
        self.sparkplug_dropped_metrics = Counter(
            "iiot_gateway_sparkplug_dropped_metrics_total",
            "Sparkplug DDATA metrics skipped (the rest of the message kept), by reason.",
            ["reason"],
            registry=r,
        )
        self.mqtt_connects = Counter(
            "iiot_gateway_mqtt_connects_total", "Successful MQTT connections.", registry=r
        )
        self.mqtt_connected = Gauge(
            "iiot_gateway_mqtt_connected", "1 while connected to the broker.", registry=r
        )
        self.queue_depth = Gauge(
            "iiot_gateway_ingest_queue_messages",
            "Messages received and waiting for the ingest thread.",
            registry=r,
        )
        self.outbox_lines = Gauge(
            "iiot_gateway_outbox_lines", "Lines waiting in the outbox.", registry=r
        )
        self.outbox_bytes = Gauge(
            "iiot_gateway_outbox_bytes", "Bytes of line protocol waiting in the outbox.", registry=r
        )
        self.outbox_dropped = Counter(
            "iiot_gateway_outbox_dropped_lines_total",
            "Lines removed by the outbox retention cap before being written.",
            registry=r,
        )
        self.written = Counter(
            "iiot_gateway_written_lines_total", "Lines written to InfluxDB.", registry=r
        )
        self.write_errors = Counter(
            "iiot_gateway_write_errors_total",
            "Failed InfluxDB write attempts (retried), by kind.",
            ["kind"],
            registry=r,
        )
        self.write_rejected = Counter(
            "iiot_gateway_write_rejected_lines_total",
            "Lines InfluxDB refused as malformed or conflicting (not retried).",
            registry=r,
        )
        self.write_latency = Histogram(
            "iiot_gateway_write_seconds",
            "Duration of one InfluxDB write request.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )

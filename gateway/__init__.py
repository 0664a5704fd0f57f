"""Gateway: MQTT ingest, InfluxDB writer with outbox, registry, ratios, API, dashboard."""

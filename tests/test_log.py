"""Structured logs: one event per line, whatever the fields hold; no secrets."""

from __future__ import annotations

import json
import logging

from iiot_common.log import JsonFormatter, LogfmtFormatter


def _record(msg: str, **fields: object) -> logging.LogRecord:
    rec = logging.makeLogRecord({"name": "iiot.test", "levelname": "WARNING", "msg": msg})
    rec.__dict__.update(fields)
    return rec


def test_a_field_from_the_network_cannot_forge_a_second_line() -> None:
    rec = _record("message rejected", source="ent-1/a1\n2026-01-01T00:00:00Z INFO fake=1")
    line = LogfmtFormatter().format(rec)
    assert "\n" not in line
    assert 'source="ent-1/a1\\n2026' in line


def test_passwords_and_tokens_are_masked_in_both_formats() -> None:
    rec = _record("connecting", password="hunter2", api_token="t0k", broker="b:1883")
    text = LogfmtFormatter().format(rec)
    doc = json.loads(JsonFormatter().format(rec))
    assert "hunter2" not in text and "t0k" not in text
    assert doc["password"] == "***" and doc["broker"] == "b:1883"

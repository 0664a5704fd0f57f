"""Structured logs: logfmt for people (default) or JSON lines for collectors.

Call sites pass fields through ``extra``::

    log.warning("device offline", extra={"device": "kiln-1", "reason": "timeout"})
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["setup_logging"]

_STD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}
_SECRET_KEYS = ("password", "token", "secret", "key")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in record.__dict__.items():
        if k in _STD or k.startswith("_"):
            continue
        # Never write credentials to a log, whoever passed them.
        out[k] = "***" if any(s in k.lower() for s in _SECRET_KEYS) else v
    return out


def _ts(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
        f".{int(record.msecs):03d}Z"
    )


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not message.isprintable():
            message = json.dumps(message, ensure_ascii=False)
        parts = [_ts(record), record.levelname.ljust(7), record.name, message]
        for k, v in _fields(record).items():
            text = str(v)
            # Quote anything that could split a line or a field: a value that came from
            # the network must not be able to forge a log line.
            if text == "" or any(c in text for c in ' "=') or not text.isprintable():
                text = json.dumps(text, ensure_ascii=False)
            parts.append(f"{k}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _ts(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger once for a CLI process (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("asyncua", "pymodbus", "amqtt", "transitions", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))

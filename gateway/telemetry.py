"""A device's recent telemetry for its chart and report: victoria-metrics or memory.

With several gateway instances on one shared subscription each receives part of a
device's messages, so each in-memory window (``gateway.quality``) holds only that part.
The writer stores every message in the time-series database, so with
``telemetry.source: victoria-metrics`` every instance reads the device's series there:
the line ``telemetry,enterprise=E,device=D,... temp=1.5,rpm=3i`` becomes the series
``telemetry_temp{enterprise="E",device="D",...}`` and ``telemetry_rpm{...}``, read back
as raw samples from ``/api/v1/export`` and grouped by timestamp into messages again.

The answer is bounded: an instant query first counts the samples of the device's fullest
series in the hours asked; when more than ``max_points``, only the latest part of the
span that should hold ``max_points`` is exported, and of it the latest ``max_points``
messages kept (``capped_from_ms`` says where the answer starts). The response is read
for at most ``timeout`` seconds and ``_MAX_BODY`` bytes. If victoria-metrics fails, the
answer comes from the in-memory window and its ``source`` says why; each failure is
counted (``iiot_gateway_telemetry_query_failures_total``) and logged once per change.

Values come back as victoria-metrics stores them: numbers as floats, booleans as 1 and
0; string points are not numbers there (stored as 0) and should not be charted from it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import httpx
from prometheus_client import CollectorRegistry, Counter

from gateway.config import GatewayConfig

__all__ = ["TelemetryAnswer", "TelemetryReader", "series_selector"]

log = logging.getLogger(__name__)

# The measurement the ingest path writes samples under (gateway.ingest.MEASUREMENT);
# victoria-metrics joins it to each field name with "_".
_MEASUREMENT = "telemetry"
_MAX_BODY = 64 << 20
_MEMORY = "memory"
_VM = "victoria-metrics"

Points = list[dict[str, Any]]


class TelemetryAnswer(NamedTuple):
    points: Points
    source: str
    # Messages before this were left out of a fuller span (more than max_points).
    capped_from_ms: int | None = None


class _Failed(Exception):
    """victoria-metrics could not answer; ``kind`` labels the failure counter."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def _quote(value: str) -> str:
    """A MetricsQL string literal: backslash, double quote and line breaks escaped."""
    escaped = (
        value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    )
    return f'"{escaped}"'


def series_selector(enterprise: str, device: str) -> str:
    """Every telemetry series of one device, as a MetricsQL series selector."""
    return (
        f'{{__name__=~"{_MEASUREMENT}_.+",enterprise={_quote(enterprise)},device={_quote(device)}}}'
    )


class TelemetryReader:
    """Reads a device's messages from victoria-metrics, or memory when it is not set or fails."""

    def __init__(self, config: GatewayConfig, metrics: CollectorRegistry) -> None:
        self.url = config.telemetry_query_url
        self.timeout = config.telemetry.timeout
        self.max_points = config.telemetry.max_points
        self.failures = Counter(
            "iiot_gateway_telemetry_query_failures_total",
            "Telemetry reads victoria-metrics failed (answered from memory), by kind.",
            ["kind"],
            registry=metrics,
        )
        self._lock = threading.Lock()
        self._last_failure: str | None = None

    def read(
        self, key: tuple[str, str], from_ms: int, to_ms: int, memory: Callable[[int], Points]
    ) -> TelemetryAnswer:
        """The device's messages from ``from_ms`` to ``to_ms``, oldest first."""
        if self.url is None:
            return TelemetryAnswer(memory(from_ms), _MEMORY)
        try:
            points, capped = self._query(self.url, key, from_ms, to_ms)
        except _Failed as exc:
            self.failures.labels(kind=exc.kind).inc()
            self._note(f"{exc.kind}: {exc}")
            return TelemetryAnswer(memory(from_ms), f"{_MEMORY} ({_VM} unreachable: {exc})")
        self._note(None)
        return TelemetryAnswer(points, _VM, capped)

    def _note(self, failure: str | None) -> None:
        """Log a change between working and failing (or to another failure), once."""
        with self._lock:
            if failure == self._last_failure:
                return
            before, self._last_failure = self._last_failure, failure
        if failure is not None:
            log.warning(
                "telemetry answered from memory: victoria-metrics failed",
                extra={"url": self.url, "error": failure},
            )
        elif before is not None:
            log.info("telemetry read from victoria-metrics again", extra={"url": self.url})

    def _query(
        self, url: str, key: tuple[str, str], from_ms: int, to_ms: int
    ) -> tuple[Points, int | None]:
        deadline = time.monotonic() + self.timeout
        selector = series_selector(*key)
        try:
            with httpx.Client(base_url=url, timeout=self.timeout) as client:
                count = self._count(client, selector, from_ms, to_ms)
                if count == 0:
                    return [], None
                start = from_ms
                if count > self.max_points:
                    # The latest part of the span that should hold max_points messages.
                    start = to_ms - (to_ms - from_ms) * self.max_points // count
                points = self._export(client, selector, start, to_ms, deadline)
        except httpx.TimeoutException as exc:
            raise _Failed("timeout", f"no answer within {self.timeout:g} s") from exc
        except httpx.HTTPStatusError as exc:
            raise _Failed("status", f"HTTP {exc.response.status_code}") from exc
        except httpx.HTTPError as exc:
            raise _Failed("connect", f"{type(exc).__name__}: {str(exc)[:200]}") from exc
        if start > from_ms or len(points) > self.max_points:
            points = points[-self.max_points :]
            return points, points[0]["ts"] if points else start
        return points, None

    def _count(self, client: httpx.Client, selector: str, from_ms: int, to_ms: int) -> int:
        """Samples of the device's fullest series in the span."""
        params = {
            "query": f"max(count_over_time({selector}[{max(1, to_ms - from_ms)}ms]))",
            "time": f"{to_ms / 1000:.3f}",
            # nocache also lifts -search.latencyOffset: samples of the last 30 s count.
            "nocache": "1",
        }
        response = client.get("/api/v1/query", params=params)
        response.raise_for_status()
        try:
            result = response.json()["data"]["result"]
            return int(float(result[0]["value"][1])) if result else 0
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise _Failed("answer", f"unexpected query answer: {exc!r}"[:200]) from exc

    def _export(
        self, client: httpx.Client, selector: str, from_ms: int, to_ms: int, deadline: float
    ) -> Points:
        """The raw samples of the span, grouped by timestamp into messages."""
        params = {
            "match[]": selector,
            "start": f"{from_ms / 1000:.3f}",
            "end": f"{to_ms / 1000:.3f}",
        }
        messages: dict[int, dict[str, Any]] = {}
        size = 0
        prefix = len(_MEASUREMENT) + 1
        with client.stream("GET", "/api/v1/export", params=params) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                size += len(line) + 1
                if size > _MAX_BODY:
                    raise _Failed("answer", f"export larger than {_MAX_BODY >> 20} MiB")
                if time.monotonic() > deadline:
                    raise _Failed("timeout", f"export not read within {self.timeout:g} s")
                if line.strip():
                    _add_series(messages, line, prefix)
        return [{"ts": ts, "values": messages[ts]} for ts in sorted(messages)]


def _add_series(messages: dict[int, dict[str, Any]], line: str, prefix: int) -> None:
    """One JSON line of an export (a series' samples) into the messages by timestamp."""
    try:
        series = json.loads(line)
        name = series["metric"]["__name__"][prefix:]
        pairs = zip(series["timestamps"], series["values"], strict=True)
        for ts, value in pairs:
            if type(value) in (int, float) and math.isfinite(value):
                messages.setdefault(int(ts), {})[name] = value
    except (ValueError, KeyError, TypeError) as exc:
        raise _Failed("answer", f"unexpected export line: {exc!r}"[:200]) from exc

"""InfluxDB line protocol, formatted by hand for the hot path, and the outbox writer.

Line protocol rules applied (InfluxDB v2 reference): the measurement escapes commas and
spaces; tag keys, tag values and field keys escape commas, equals signs and spaces (and
backslashes, so that a trailing backslash cannot swallow the separator); string field
values are double-quoted with backslashes and double quotes escaped. Newlines cannot
appear inside a line, so a newline in a tag or string is written as the two characters
``\\n``. Integers outside int64 are written as floats (JSON parsers differ on them, and a
float keeps the magnitude); NaN and infinite floats have no line-protocol form and are
left out. Timestamps are milliseconds (the writer sends ``precision=ms``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from gateway.config import InfluxConfig
from gateway.metrics import DataPathMetrics
from gateway.outbox import Outbox, OutboxBatch
from iiot_common.backoff import Backoff

__all__ = [
    "InfluxWriter",
    "WriteRejected",
    "escape_key",
    "escape_measurement",
    "escape_string",
    "format_fields",
    "format_finite_fields",
    "series_prefix",
]

log = logging.getLogger(__name__)

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_FLOAT_MAX_INT = 2**1023  # beyond this float() overflows

_KEY_ESCAPES = str.maketrans(
    {"\\": "\\\\", ",": "\\,", "=": "\\=", " ": "\\ ", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
)
_MEASUREMENT_ESCAPES = str.maketrans(
    {"\\": "\\\\", ",": "\\,", " ": "\\ ", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
)
_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})


def escape_key(text: str) -> str:
    """Escape a tag key, tag value or field key."""
    return text.translate(_KEY_ESCAPES)


def escape_measurement(text: str) -> str:
    return text.translate(_MEASUREMENT_ESCAPES)


def escape_string(text: str) -> str:
    """Body of a string field value (without the surrounding quotes)."""
    return text.translate(_STRING_ESCAPES)


def series_prefix(measurement: str, tags: Mapping[str, str | None]) -> str:
    """``measurement,tag=v,...`` followed by the space before the fields; empty tags omitted."""
    parts = [escape_measurement(measurement)]
    for key in sorted(tags):
        value = tags[key]
        if value:
            parts.append(f"{escape_key(key)}={escape_key(value)}")
    return ",".join(parts) + " "


# Field keys repeat on every sample; caching their escaped form saves a translate each.
_field_keys: dict[str, str] = {}


def format_fields(values: Mapping[str, Any], skip: Mapping[str, Any] | None = None) -> str:
    """The field set of one line; empty if no value has a line-protocol form."""
    if not skip:
        fast = _finite_floats(values)
        if fast is not None:
            return fast
    return _format_fields(values, skip)


def _finite_floats(values: Mapping[str, Any]) -> str | None:
    """The hot path: the fields when every value is a finite float with a known key."""
    try:
        # x - x is NaN for inf and NaN, so they fall through to the general path.
        parts = [
            f"{_field_keys[k]}={v!r}"
            for k, v in values.items()
            if type(v) is float and v - v == 0.0
        ]
    except KeyError:
        return None
    return ",".join(parts) if parts and len(parts) == len(values) else None


def format_finite_fields(
    values: Mapping[str, Any], skip: Mapping[str, Any] | None = None
) -> str | None:
    """``format_fields``, or None when a float value is NaN or infinite (to be counted)."""
    if not skip:
        fast = _finite_floats(values)
        if fast is not None:
            return fast
    for key, v in values.items():
        if type(v) is float and v - v != 0.0 and (skip is None or key not in skip):
            return None
    return _format_fields(values, skip)


def _format_fields(values: Mapping[str, Any], skip: Mapping[str, Any] | None) -> str:
    out: list[str] = []
    for key, value in values.items():
        if skip is not None and key in skip:
            continue
        k = _field_keys.get(key)
        if k is None:
            k = escape_key(key)
            if len(_field_keys) < 100_000:
                _field_keys[key] = k
        t = type(value)
        if t is float:
            if math.isfinite(value):
                out.append(f"{k}={value!r}")
        elif t is int:
            if _INT64_MIN <= value <= _INT64_MAX:
                out.append(f"{k}={value}i")
            elif -_FLOAT_MAX_INT < value < _FLOAT_MAX_INT:
                out.append(f"{k}={float(value)!r}")
        elif t is bool:
            out.append(f"{k}=true" if value else f"{k}=false")
        elif t is str:
            out.append(f'{k}="{value.translate(_STRING_ESCAPES)}"')
    return ",".join(out)


class WriteRejected(Exception):
    """The database refused the lines themselves (HTTP 400/422); retrying will not help."""


def _influx_write_fn(config: InfluxConfig) -> tuple[Callable[[str], None], Callable[[], None]]:
    """A ``write(body)`` function on influxdb-client's synchronous WriteApi, and a closer."""
    from influxdb_client.client.influxdb_client import InfluxDBClient
    from influxdb_client.client.write_api import SYNCHRONOUS
    from influxdb_client.domain.write_precision import WritePrecision
    from influxdb_client.rest import ApiException

    assert config.url is not None
    client = InfluxDBClient(
        url=config.url,
        token=config.token.get_secret_value() if config.token else "",
        org=config.org,
        timeout=int(config.timeout * 1000),
        enable_gzip=config.gzip,
    )
    api = client.write_api(write_options=SYNCHRONOUS)

    def write(body: str) -> None:
        try:
            api.write(
                bucket=config.bucket,
                org=config.org,
                record=body,
                write_precision=WritePrecision.MS,  # type: ignore[arg-type]
            )
        except ApiException as exc:
            if exc.status in (400, 422):
                raise WriteRejected(f"HTTP {exc.status}: {str(exc.body)[:300]}") from exc
            raise

    def close() -> None:
        api.close()  # type: ignore[no-untyped-call]
        client.close()  # type: ignore[no-untyped-call]

    return write, close


class InfluxWriter:
    """A thread that drains the outbox to InfluxDB in batches, retrying while it is down.

    Nothing is removed from the outbox until the database accepted it, except lines the
    database refuses as malformed (HTTP 400/422), which are counted and dropped so that
    one bad line cannot block the queue forever.
    """

    def __init__(
        self,
        outbox: Outbox,
        config: InfluxConfig,
        *,
        metrics: DataPathMetrics | None = None,
        write: Callable[[str], None] | None = None,
        max_backoff: float = 30.0,
        initial_backoff: float = 0.2,
    ) -> None:
        self.outbox = outbox
        self.config = config
        self.metrics = metrics or outbox.metrics
        self._close: Callable[[], None] = lambda: None
        if write is None:
            write, self._close = _influx_write_fn(config)
        self._write = write
        self.backoff = Backoff(initial=initial_backoff, maximum=max_backoff)
        # Since when (monotonic) writes have failed without a success between; why.
        self._failing_since: float | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._drain_deadline = math.inf
        self._thread: threading.Thread | None = None
        self.last_batch_at: float | None = None
        # Called after each successful write with the batch and the wall time it finished.
        self.on_written: Callable[[OutboxBatch, float], None] | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="iiot-influx-writer", daemon=True)
        self._thread.start()

    def stop(self, drain_timeout: float = 10.0) -> None:
        """Write what is pending for up to ``drain_timeout`` seconds, then stop."""
        self._drain_deadline = time.monotonic() + drain_timeout
        self._stop.set()
        self.outbox.wake()
        if self._thread is not None:
            self._thread.join(drain_timeout + self.config.timeout + 5)
            self._thread = None
        self._close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def failing_for(self) -> float:
        """Seconds the database has refused or failed every write (0 when the last worked)."""
        since = self._failing_since
        return 0.0 if since is None else time.monotonic() - since

    def _run(self) -> None:
        batch_lines = self.config.batch_lines
        while True:
            stopping = self._stop.is_set()
            if stopping and time.monotonic() >= self._drain_deadline:
                if self.outbox.pending_lines:
                    log.warning(
                        "writer stopped with lines pending; they stay in the outbox",
                        extra={"lines": self.outbox.pending_lines},
                    )
                return
            if not stopping:
                # Wait for a full batch, but never hold lines longer than flush_interval.
                self.outbox.wait(batch_lines, self.config.flush_interval)
            try:
                batch = self.outbox.read(batch_lines)
            except Exception:
                log.exception("outbox read failed")
                self._stop.wait(1.0)
                continue
            if batch is None:
                if stopping:
                    return
                continue
            if self._write_batch(batch):
                self.backoff.succeeded()
                continue
            # Database down or failing: wait by the shared policy; stop cuts it short.
            wait = self.backoff.next_delay()
            if stopping:
                time.sleep(min(wait, max(0.0, self._drain_deadline - time.monotonic())))
            else:
                self._stop.wait(wait)

    def _write_batch(self, batch: OutboxBatch) -> bool:
        start = time.perf_counter()
        try:
            self._write(batch.body)
        except WriteRejected as exc:
            self.metrics.write_rejected.inc(batch.lines)
            log.error(
                "database refused a batch; dropped",
                extra={"lines": batch.lines, "error": str(exc)},
            )
            self.outbox.delete(batch)
            return True
        except Exception as exc:
            kind = type(exc).__name__
            self.metrics.write_errors.labels(kind=kind).inc()
            self.last_error = f"{kind}: {str(exc)[:300]}"
            if self._failing_since is None:
                self._failing_since = time.monotonic()
            log.warning(
                "write failed; will retry",
                extra={"lines": batch.lines, "error": f"{kind}: {str(exc)[:300]}"},
            )
            return False
        elapsed = time.perf_counter() - start
        self._failing_since = None
        self.metrics.write_latency.observe(elapsed)
        self.metrics.written.inc(batch.lines)
        self.outbox.delete(batch)
        self.last_batch_at = time.time()
        if self.on_written is not None:
            self.on_written(batch, self.last_batch_at)
        return True

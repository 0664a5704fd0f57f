"""The agent's ``/metrics`` endpoint, served on the agent's own event loop in slices.

prometheus_client's server renders in a thread. Rendering holds the GIL, and the event
loop, which gives the GIL up on every socket call, then waits for it again each time:
at thousands of devices a scrape stalled polling for a large part of a second. Here the
exposition is formatted on the loop a few hundred lines at a time, yielding between
slices, so a scrape costs the pollers no more than any other short task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString as _untyped_go_float

__all__ = ["MetricsServer"]

_SLICE = 300  # lines formatted between two yields to the loop
_READ_LIMIT = 8192  # a scrape request is a few hundred bytes
_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_MAX_HEADS = 200_000  # label texts kept between scrapes (a few lines per device)


def _go_float(value: float) -> str:
    """A sample value as prometheus_client writes it (``+Inf``, ``1.0``)."""
    return str(_untyped_go_float(value))  # type: ignore[no-untyped-call]


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _family_lines(metric: Metric, samples: Iterable[Sample] | None = None) -> Iterator[str]:
    """One metric family in the text exposition format, as prometheus_client writes it.

    Without the ``_created`` samples: one more line per device and counter that
    Prometheus does not use from the text format. ``samples`` (default: the family's)
    may be a lazy iterable, so that formatting can pause between any two lines.
    """
    name, mtype = metric.name, metric.type
    if mtype == "counter":
        name += "_total"
    elif mtype in ("info", "stateset", "gaugehistogram", "unknown"):
        mtype = {"info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram"}.get(
            mtype, "untyped"
        )
    doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
    yield f"# HELP {name} {doc}\n# TYPE {name} {mtype}\n"
    for s in metric.samples if samples is None else samples:
        if s.name.endswith("_created"):
            continue
        labels = ",".join(f'{k}="{_escape(v)}"' for k, v in s.labels.items())
        head = f"{s.name}{{{labels}}}" if labels else s.name
        yield f"{head} {_go_float(s.value)}\n"


class MetricsServer:
    """GET /metrics (and /) on host:port, rendered cooperatively on the running loop."""

    def __init__(self, registry: CollectorRegistry, metrics: Iterable[Any] = ()) -> None:
        """``metrics``: the registry's metric objects, formatted child by child.

        ``registry.collect()`` builds every sample of a family at once (tens of
        milliseconds for thousands of devices, without a pause); for these metrics the
        samples are drawn one at a time instead (prometheus_client's ``_get_metric`` and
        ``_samples``, which ``collect()`` is made of). Others go through ``collect()``.
        """
        self.registry = registry
        self._lazy = [m for m in metrics if hasattr(m, "_get_metric") and hasattr(m, "_samples")]
        self._heads: dict[tuple[str, tuple[str, ...]], str] = {}  # -> 'name{labels} '

        self._server: asyncio.Server | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen; raises OSError when the address cannot be bound."""
        self._server = await asyncio.start_server(self._handle, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5.0)

    async def render(self) -> bytes:
        """The whole exposition, yielding to the loop every ``_SLICE`` lines."""
        out: list[str] = []
        n = 0
        for family in self._families():
            for line in family:
                out.append(line)
                n += 1
                if n % _SLICE == 0:
                    await asyncio.sleep(0)
        return "".join(out).encode()

    def _families(self) -> Iterator[Iterator[str]]:
        lazy_names = set()
        for m in self._lazy:
            head: Metric = m._get_metric()
            lazy_names.add(head.name)
            if isinstance(m, Counter | Gauge) and m._labelnames:
                yield self._children_lines(m, head)
                continue
            samples = (
                Sample(head.name + suffix, labels, value, ts, ex)
                for suffix, labels, value, ts, ex, *_ in m._samples()
            )
            yield _family_lines(head, samples)
        # The other collectors one by one, so the lazy ones are not collected again.
        collectors = getattr(self.registry, "_collector_to_names", None)
        if collectors is None:
            for metric in self.registry.collect():
                if metric.name not in lazy_names:
                    yield _family_lines(metric)
            return
        lazy = {id(m) for m in self._lazy}
        for c in list(collectors):
            if id(c) in lazy:
                continue
            if hasattr(c, "lines"):
                # It writes its own lines (one per device and event): drawn one at a time.
                yield c.lines(_escape, _go_float)
            else:
                for metric in c.collect():
                    yield _family_lines(metric)

    def _children_lines(self, m: Counter | Gauge, head: Metric) -> Iterator[str]:
        """A labelled counter's or gauge's lines, one per child, as ``_family_lines`` writes them.

        Read straight from the children, with each child's ``name{labels} `` made once
        and kept: at thousands of devices, building every sample and its label text anew
        on each scrape cost most of the scrape.
        """
        name = head.name + "_total" if isinstance(m, Counter) else head.name
        doc = head.documentation.replace("\\", r"\\").replace("\n", r"\n")
        yield f"# HELP {name} {doc}\n# TYPE {name} {head.type}\n"
        with m._lock:
            children: list[tuple[Sequence[str], Any]] = list(m._metrics.items())
        heads = self._heads
        if len(heads) > _MAX_HEADS:
            heads.clear()  # children of removed devices; the live ones come back at once
        labelnames = m._labelnames
        for values, child in children:
            key = (name, tuple(values))
            prefix = heads.get(key)
            if prefix is None:
                labels = ",".join(
                    f'{k}="{_escape(v)}"' for k, v in zip(labelnames, values, strict=True)
                )
                prefix = heads[key] = f"{name}{{{labels}}} "
            yield prefix + _go_float(child._value.get()) + "\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10.0):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > _READ_LIMIT:
                raise ValueError("request too large")
            parts = head.split(b"\r\n", 1)[0].split()
            method = parts[0] if parts else b""
            path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
            if method not in (b"GET", b"HEAD"):
                await _respond(writer, 405, b"method not allowed\n")
            elif path not in (b"/metrics", b"/"):
                await _respond(writer, 404, b"not found\n")
            else:
                body = await self.render()
                await _respond(writer, 200, b"" if method == b"HEAD" else body, len(body))
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, ConnectionError):
            pass  # a client that hangs up or sends garbage gets nothing more
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _respond(
    writer: asyncio.StreamWriter, status: int, body: bytes, length: int | None = None
) -> None:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}[status]
    size = len(body) if length is None else length
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {_CONTENT_TYPE}\r\n"
        f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode()
    )
    writer.write(body)
    await writer.drain()

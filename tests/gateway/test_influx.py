"""Line protocol formatting and the outbox writer against a real victoria-metrics."""

from __future__ import annotations

from pathlib import Path

from gateway.config import InfluxConfig
from gateway.influx import InfluxWriter, WriteRejected, format_fields, series_prefix
from gateway.metrics import DataPathMetrics
from gateway.outbox import Outbox
from iiot_common.localservers import VictoriaMetrics
from tests.waiting import wait_until


def test_series_prefix_escapes_and_omits_empty_tags() -> None:
    prefix = series_prefix(
        "tele metry", {"device": "a,b=c d", "family": "", "profile": None, "agent": "x\\"}
    )
    assert prefix == "tele\\ metry,agent=x\\\\,device=a\\,b\\=c\\ d "


def test_fields_by_type() -> None:
    fields = format_fields(
        {
            "t": 21.5,
            "n": 3,
            "on": True,
            "off": False,
            "s": 'say "hi"\\\nnext',
            "none": None,
            "nan": float("nan"),
            "inf": float("inf"),
            "big": 2**70,
            "we ird,k=": 1.0,
        }
    )
    assert fields.split(",", 4)[:4] == ["t=21.5", "n=3i", "on=true", "off=false"]
    assert 's="say \\"hi\\"\\\\\\nnext"' in fields
    assert "none" not in fields and "nan" not in fields and "inf" not in fields
    assert "big=1.1805916207174113e+21" in fields  # beyond int64: kept as a float
    assert fields.endswith("we\\ ird\\,k\\==1.0")


def test_error_points_are_not_fields() -> None:
    assert format_fields({"a": 1.0, "b": None}, {"b": "timeout"}) == "a=1.0"


def _lines(n: int, start: int = 0) -> list[str]:
    base = 1_700_000_000_000
    return [
        f"telemetry,device=d1,enterprise=e1 temp={20 + i % 7}.5,count={i}i {base + i * 1000}"
        for i in range(start, start + n)
    ]


def _series(vm: VictoriaMetrics, name: str) -> dict[str, object]:
    found = [s for s in vm.export() if s["metric"]["__name__"] == name]  # type: ignore[index]
    assert len(found) == 1, found
    return found[0]


def test_writer_drains_outbox_into_victoria(tmp_path: Path, victoria: VictoriaMetrics) -> None:
    metrics = DataPathMetrics()
    box = Outbox(tmp_path / "o.db", metrics=metrics)
    box.append(_lines(120))
    writer = InfluxWriter(
        box, InfluxConfig(url=victoria.url, batch_lines=50, flush_interval=0.05), metrics=metrics
    )
    writer.start()
    try:
        wait_until(lambda: not box.pending_lines, 10, "the outbox to drain")
    finally:
        writer.stop(2)
        box.close()
    series = _series(victoria, "telemetry_count")
    assert series["metric"] == {"__name__": "telemetry_count", "device": "d1", "enterprise": "e1"}
    assert isinstance(series["values"], list)
    assert sorted(series["values"]) == list(range(120))
    assert metrics.registry.get_sample_value("iiot_gateway_written_lines_total") == 120


def test_database_down_then_back_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    vm = VictoriaMetrics(tmp_path / "vm-dir")
    (tmp_path / "vm-dir").mkdir()
    vm.start()
    metrics = DataPathMetrics()
    box = Outbox(tmp_path / "o.db", metrics=metrics)
    writer = InfluxWriter(
        box,
        InfluxConfig(url=vm.url, batch_lines=100, flush_interval=0.05, timeout=2),
        metrics=metrics,
        initial_backoff=0.05,
        max_backoff=0.3,
    )
    writer.start()
    try:
        box.append(_lines(100))
        wait_until(lambda: not box.pending_lines, 10, "the outbox to drain")
        vm.stop()
        box.append(_lines(300, start=100))
        wait_until(
            lambda: bool(
                metrics.registry.get_sample_value(
                    "iiot_gateway_write_errors_total", {"kind": "NewConnectionError"}
                )
            ),
            10,
            "a connection error counted",
        )
        assert box.pending_lines == 300  # kept while the database is down
        vm.start()  # same port, same data directory
        wait_until(lambda: not box.pending_lines, 15, "the outbox to drain")
        assert box.pending_lines == 0
        values = _series(vm, "telemetry_count")["values"]
        assert isinstance(values, list)
        assert sorted(values) == list(range(400))
    finally:
        writer.stop(1)
        box.close()
        vm.stop()


def test_refused_lines_are_dropped_and_counted(tmp_path: Path) -> None:
    metrics = DataPathMetrics()
    box = Outbox(tmp_path / "o.db", metrics=metrics)
    written: list[str] = []

    def write(body: str) -> None:
        if "bad" in body:
            raise WriteRejected("HTTP 400: unable to parse")
        written.append(body)

    box.append(["bad line"])
    box.append(_lines(3))
    writer = InfluxWriter(
        box,
        InfluxConfig(url="http://unused", batch_lines=1, flush_interval=0.02),
        write=write,
        metrics=metrics,
    )
    writer.start()
    try:
        wait_until(lambda: not box.pending_lines, 5, "the outbox to drain")
    finally:
        writer.stop(1)
        box.close()
    assert "\n".join(written).splitlines() == _lines(3)
    assert metrics.registry.get_sample_value("iiot_gateway_write_rejected_lines_total") == 1

"""What sharing the data-quality gate's buckets through PostgreSQL costs, per instance.

Starts a PostgreSQL on loopback and two registries on it (two gateway instances). The
first counts one message a device for ``--devices`` devices and writes its buckets
(``share_quality``: the flush's part), twice: once inserting every row, once adding to
them. The second reads and folds them after each (``fold_quality``: its sharing thread's
part, apart from the refresh pass, which is timed too), and
a third instance started afterwards loads them all (a restart). Prints seconds and rows
a second for each, with the load average: the figures mean little without it on a
shared machine.

    .venv/bin/python bench/quality_share.py [--devices 1000000]
"""

from __future__ import annotations

import argparse
import os
import time

from gateway.quality import QualityWindow
from gateway.registry import Registry
from gateway.sink import SampleSummary
from iiot_common.localservers import PostgreSQL


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} on {os.cpu_count()} cores"


def _count(window: QualityWindow, devices: int, ts: int, value: float) -> float:
    began = time.perf_counter()
    for k in range(devices):
        ent, dev = f"ent-{k // 50:06d}", f"d{k % 50:02d}"
        summary = SampleSummary(
            ent, "a", dev, count=1, first_ts=ts, last_ts=ts, last_good_ts=ts, latest={"v": value}
        )
        window.record(summary)
    return time.perf_counter() - began


def _timed(what: str, rows: int, seconds: float) -> None:
    rate = rows / seconds if seconds > 0 else float("inf")
    print(f"  {what:<44} {rows:>9,} rows {seconds:7.2f} s  {rate:>10,.0f} rows/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1_000_000)
    args = parser.parse_args()
    n = args.devices
    server = PostgreSQL().start()
    try:
        url = server.create_database()
        writer, reader = Registry(url), Registry(url)
        print(f"{n:,} devices, one bucket each; {_load()}", flush=True)
        ts = int(time.time() * 1000)
        _timed("counting (ingest, in memory)", n, _count(writer.quality, n, ts, 1.0))
        assert reader.quality_loaded(60), "the shared buckets were not read within 60 s"
        for round_, value in (("insert", 1.0), ("add", 2.0)):
            if round_ == "add":
                _count(writer.quality, n, ts + 1, value)
            began = time.perf_counter()
            rows = writer.share_quality()
            _timed(f"flush: write the buckets ({round_})", rows, time.perf_counter() - began)
            began = time.perf_counter()
            reader.refresh()  # device rows only: the quality rows wait for the fold
            _timed(f"refresh pass, those rows unread ({round_})", 0, time.perf_counter() - began)
            began = time.perf_counter()
            folded = reader.fold_quality()
            _timed(f"share thread: read and fold ({round_})", folded, time.perf_counter() - began)
        began = time.perf_counter()
        third = Registry(url)
        # The load runs in the background: timed until the buckets are in.
        assert third.quality_loaded(600), "the shared buckets were not read within 600 s"
        _timed("start: load every bucket", n, time.perf_counter() - began)
        judged = third.quality.judge(("ent-000000", "d00"), ts + 1000, 3600_000)
        assert judged["samples"] == 2 and not judged["frozen"], judged
        print(f"  {_load()}", flush=True)
        for reg in (writer, reader, third):
            reg.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()

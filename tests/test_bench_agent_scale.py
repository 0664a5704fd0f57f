"""``bench/agent_scale.py`` still runs end to end and counts every datapoint at a small N."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from iiot_common.localservers import require

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "agent_scale.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("agent_scale", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # its dataclasses look themselves up there
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def test_agent_scale_bench_prints_a_row_with_everything_delivered() -> None:
    require("mosquitto", "mosquitto")  # missing: the suite reports a skip
    cmd = [sys.executable, str(BENCH), "--devices", "20", "--duration", "3", "--warmup", "2",
           "--no-bare", "--shape", "device"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split() for line in out.stdout.splitlines()]
    header = next(cells for cells in lines if cells[:1] == ["N"])
    row = dict(zip(header, next(cells for cells in lines if cells[:1] == ["20"]), strict=True))
    report = out.stdout + out.stderr[-3000:]
    assert row["deliv/off"] != "-", report  # "-": nothing arrived (the note says why)
    assert float(row["deliv/off"]) >= 0.99, report
    assert float(row["first_s"]) > 0, report


def test_the_bench_counts_device_and_batch_messages_alike_each_sample_once() -> None:
    counter = _bench()._Counter()
    one = {"ts": 1000, "values": {"a": 1.5, "b": 2}, "errors": {}}
    two = {**one, "ts": 2000}
    data = {"seq": 5, "samples": [one, two]}
    counter.on_message("iiot/v1/e/agent/d1/data", json.dumps(data).encode())
    batch = {"devices": {"d1": {"seq": 7, "samples": [two]}, "d2": {"seq": 0, "samples": [one]}}}
    counter.on_message("iiot/v1/e/agent/batch", json.dumps(batch).encode())
    counter.on_message("iiot/v1/e/agent/d1/data", json.dumps(data).encode())  # a redelivery
    counter.on_message("iiot/v1/e/agent/d3/data", b"not json")
    window = counter.in_window(0, 10_000)
    assert sorted((ts, n) for ts, _, n in window) == [(1000, 2), (1000, 2), (2000, 2), (2000, 2)]
    assert counter.duplicates == 2
    assert counter.bad == 1
    assert counter.in_window(1500, 10_000) == [s for s in window if s[0] == 2000]

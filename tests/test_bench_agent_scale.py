"""``bench/agent_scale.py`` still runs end to end and counts every datapoint at a small N."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from iiot_common.localservers import require

ROOT = Path(__file__).resolve().parents[1]


def test_agent_scale_bench_prints_a_row_with_everything_delivered() -> None:
    require("mosquitto", "mosquitto")  # missing: the suite reports a skip
    cmd = [sys.executable, str(ROOT / "bench" / "agent_scale.py"), "--devices", "20",
           "--duration", "3", "--warmup", "2", "--no-bare"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split() for line in out.stdout.splitlines()]
    header = next(cells for cells in lines if cells[:1] == ["N"])
    row = dict(zip(header, next(cells for cells in lines if cells[:1] == ["20"]), strict=True))
    report = out.stdout + out.stderr[-3000:]
    assert row["deliv/off"] != "-", report  # "-": nothing arrived (the note says why)
    assert float(row["deliv/off"]) >= 0.99, report
    assert float(row["first_s"]) > 0, out.stdout

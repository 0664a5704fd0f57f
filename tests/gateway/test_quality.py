"""The data-quality gate's window: verdicts over many buckets, trimmed and compacted."""

from __future__ import annotations

from collections.abc import Callable

from gateway.quality import QualityWindow
from gateway.sink import SampleSummary

T0 = 1_750_000_000_000
HOUR = 3600_000
BUCKET = HOUR // 2  # a 24 h horizon in 48 buckets
DAY = 24 * HOUR


def _send(window: QualityWindow, device: str, ts: int, count: int, value: float) -> None:
    summary = SampleSummary(
        "e", "a", device, count=count, first_ts=ts, last_ts=ts, last_good_ts=ts, latest={"v": value}
    )
    window.record(summary)


def test_verdicts_hold_over_a_week_of_buckets_trimmed_and_compacted() -> None:
    # Watched for ten days, one message a 30-minute bucket a device for a week: each
    # device's list is trimmed many times over and the columns compacted.
    window = QualityWindow(poll_interval_s=60, clock=lambda: (T0 - 10 * DAY) / 1000)
    kinds: dict[str, tuple[int, Callable[[int], float]]] = {
        "steady": (30, lambda b: float(b % 3)),  # every expected sample, values moving
        "frozen": (30, lambda b: 1.0),  # every sample, the same values all along
        "sparse": (10, lambda b: float(b)),  # a third of the expected samples
    }
    devices = [(f"{kind}-{n}", kind) for n in range(12) for kind in kinds]
    for b in range(7 * 48):  # oldest first, as a device sends
        start = T0 - 7 * DAY + b * BUCKET
        for device, kind in devices:
            count, value = kinds[kind]
            _send(window, device, start + 1000, count, value(b))
    # A late message for an hour ago's bucket counts in it.
    _send(window, "sparse-0", T0 - HOUR + 2000, 40, 5.0)
    positions = {("e", device): i for i, (device, _kind) in enumerate(devices)}
    mask = window.mask(positions, len(devices), T0, DAY)
    passes = {device for i, (device, _kind) in enumerate(devices) if mask[i]}
    assert passes == {device for device, kind in devices if kind == "steady"}
    for i, (device, _kind) in enumerate(devices):
        judged = window.judge(("e", device), T0, DAY)
        assert judged["passes"] == bool(mask[i]), device
    assert window.judge(("e", "frozen-3"), T0, DAY)["frozen"] is True
    sparse = [window.judge(("e", f"sparse-{n}"), T0, DAY)["samples"] for n in range(2)]
    assert sparse[0] == sparse[1] + 40
    steady = window.judge(("e", "steady-5"), T0, DAY)
    assert 47 * 30 <= steady["samples"] <= 49 * 30 and steady["expected"] == 24 * 60
    # Trimmed buckets count in no window, and the rows kept stay bounded.
    old = window.mask(positions, len(devices), T0 - 5 * DAY, DAY)
    assert not old.any()  # their buckets were trimmed: nothing left to judge them by
    assert window._buckets.used <= 4 * 48 * len(devices)  # of 7 * 48 sent a device

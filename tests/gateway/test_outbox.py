"""The outbox keeps lines durably, hands them out oldest first and caps what it keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.metrics import DataPathMetrics
from gateway.outbox import Outbox


def test_lines_survive_reopen_and_come_out_oldest_first(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.append([f"m v={i}i {i}" for i in range(3)])
    box.append([f"m v={i}i {i}" for i in range(3, 5)])
    box.close()

    box = Outbox(tmp_path / "o.db")
    assert box.pending_lines == 5
    first = box.read(3)
    assert first is not None
    assert first.body.splitlines() == ["m v=0i 0", "m v=1i 1", "m v=2i 2"]
    box.delete(first)
    rest = box.read(100)
    assert rest is not None and rest.lines == 2
    assert rest.body.splitlines()[0] == "m v=3i 3"
    box.delete(rest)
    assert box.pending_lines == 0 and box.read(100) is None
    box.close()


def test_read_batches_whole_chunks_up_to_the_limit(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    for c in range(10):
        box.append([f"m v={c}i {c * 10 + i}" for i in range(10)])
    batch = box.read(35)
    assert batch is not None and batch.lines == 30
    box.close()


def test_a_big_append_is_read_back_in_batch_sized_pieces(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", chunk_lines=100)
    box.append([f"m v={i}i {i}" for i in range(250)])
    sizes = []
    while (batch := box.read(100)) is not None:
        sizes.append(batch.lines)
        box.delete(batch)
    assert sizes == [100, 100, 50]
    box.close()


def test_failed_transaction_leaves_nothing_behind(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    with pytest.raises(RuntimeError), box.transaction() as tx:
        assert tx.first_time("e/a/d", 1, 1000)
        tx.add(["m v=1i 1000"])
        raise RuntimeError("boom")
    assert box.pending_lines == 0
    with box.transaction() as tx:
        # The key was rolled back with the lines, so the sample is still new.
        assert tx.first_time("e/a/d", 1, 1000)
        assert not tx.first_time("e/a/d", 1, 1000)
        assert tx.first_time("e/a/d", 1, 2000)  # a reset agent: same seq, newer ts
    box.close()


def test_dedup_record_survives_restart(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    with box.transaction() as tx:
        assert tx.first_time("e/a/d", 7, 1000)
    box.close()
    box = Outbox(tmp_path / "o.db")
    with box.transaction() as tx:
        assert not tx.first_time("e/a/d", 7, 1000)
        assert tx.first_time("e/a/d", 8, 1010)
    box.close()


def test_dedup_window_is_bounded(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", dedup_window=1000)
    for start in range(0, 5000, 500):
        with box.transaction() as tx:
            for s in range(start, start + 500):
                tx.first_time("e/a/d", s, s)
    rows = box._db.execute("SELECT COUNT(*) FROM seen").fetchone()[0]
    assert rows <= 2500
    with box.transaction() as tx:
        assert not tx.first_time("e/a/d", 4999, 4999)  # recent keys are still known
    box.close()


def test_retention_cap_drops_oldest_and_counts(tmp_path: Path) -> None:
    metrics = DataPathMetrics()
    box = Outbox(tmp_path / "o.db", max_lines=1000, metrics=metrics)
    for c in range(15):
        box.append([f"m v={c}i {c * 100 + i}" for i in range(100)])
    assert box.pending_lines <= 1000
    dropped = metrics.registry.get_sample_value("iiot_gateway_outbox_dropped_lines_total")
    assert dropped == 500
    batch = box.read(100)
    assert batch is not None and batch.body.startswith("m v=5i ")
    assert metrics.registry.get_sample_value("iiot_gateway_outbox_lines") == box.pending_lines
    box.close()


def test_age_cap_drops_old_lines(tmp_path: Path) -> None:
    now = [1_000_000.0]
    metrics = DataPathMetrics()
    box = Outbox(tmp_path / "o.db", max_age=60, metrics=metrics, clock=lambda: now[0])
    box.append(["m v=1i 1"])
    now[0] += 61
    box.append(["m v=2i 2"])
    assert box.enforce_retention() == 1
    batch = box.read(10)
    assert batch is not None and batch.body == "m v=2i 2"
    box.close()

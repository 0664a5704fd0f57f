"""Group commit in the spool: a sample is spooled (and reported) only once committed."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edge_agent.spool import Spool
from protocols.driver import Reading
from protocols.mqtt.codec import JSON_CODEC
from protocols.mqtt.contract import DataMessage, Sample, encode


def test_staged_samples_are_not_spooled_before_their_commit(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    assert [spool.stage("d1", 1000 + i, f'{{"ts":{1000 + i}}}') for i in range(3)] == [1, 2, 3]
    # What another process (a restarted agent after kill -9) would find: nothing yet.
    other = Spool(tmp_path / "s.db")
    assert other.depth == 0 and other.last_seq("d1") is None
    other.close()
    assert spool.commit() == ["d1"]
    again = Spool(tmp_path / "s.db")
    assert again.depth == 3 and again.last_seq("d1") == 3
    assert [r.seq for r in again.batch("d1")] == [1, 2, 3]
    again.close()
    spool.close()


def test_append_after_stage_keeps_seq_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    spool.stage("d1", 1, "{}")
    assert spool.append("d1", 2, "{}") == 2
    assert [r.seq for r in spool.batch("d1")] == [1, 2]
    spool.close()


async def test_group_commit_reports_devices_and_deletes_acknowledged_rows(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    commits: list[tuple[list[str], int]] = []
    spool.start_group_commit(asyncio.get_running_loop(), 0.005, lambda d, n: commits.append((d, n)))
    for i in range(5):
        spool.stage("a", i, "{}")
        spool.stage("b", i, "{}")
    assert spool.depth == 0 and spool.staged == 10
    for _ in range(100):
        if commits:
            break
        await asyncio.sleep(0.005)
    assert commits == [(["a", "b"], 10)]  # ten samples, one commit
    assert spool.depth == 10
    spool.ack_later([r.id for r in spool.batch("a")])
    assert spool.depth == 10  # deleted with the next commit
    spool.flush()
    assert spool.depth == 5 and spool.batch("a") == []
    spool.stage("b", 9, "{}")
    spool.close()  # commits what is staged
    again = Spool(tmp_path / "s.db")
    assert again.depth == 6 and again.last_seq("b") == 6
    again.close()


def test_fast_sample_json_is_the_contract_json() -> None:
    readings = [
        Reading(ts=1, values={"t": 21.5, "n": -3, "ok": True, "sn": "Ä-1"}, errors={"x": "e"}),
        Reading(ts=2, values={"v": 1e-30}, quality={"v": "Uncertain"}),
        Reading(ts=3),
    ]
    for r in readings:
        body = JSON_CODEC.encode_sample(r.ts, r.values, r.errors, r.quality)
        model = Sample(ts=r.ts, values=r.values, errors=r.errors, quality=r.quality or None)
        assert body == encode(model).decode()
        DataMessage.model_validate_json('{"seq":1,"samples":[' + body + "]}")

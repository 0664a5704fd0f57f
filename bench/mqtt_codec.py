"""CPU cost per message of the data path's codec steps, in this process (no broker).

Times, on the shape ``bench/gateway_ingest.py`` publishes (one sample of ``--points``
float points per message): the agent's ``encode_sample``, the publisher's ``pack`` of
10 spooled bodies, the gateway's ``decode_data`` and the whole ``MessageProcessor.handle``
(decode, dedup check, line protocol). Best of ``--repeat`` runs of CPU time, so other
load on the machine disturbs it less than the end-to-end benchmark.

    .venv/bin/python bench/mqtt_codec.py [--messages 20000] [--points 20] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway.ingest import MessageProcessor  # noqa: E402
from gateway.sink import SampleSummary  # noqa: E402
from protocols.mqtt.codec import JSON_CODEC, Codec  # noqa: E402
from protocols.mqtt.contract import Birth, DeviceState, Will  # noqa: E402


class _Sink:
    def check_publisher(self, enterprise: str, agent: str) -> str | None:
        return None

    def device_tags(self, enterprise: str, device: str) -> tuple[str, str] | None:
        return ("kiln", "bench-kiln")  # not a shipped profile: p0..p19 are its names

    def device_owner(self, enterprise: str, device: str) -> str | None:
        return None

    def on_birth(
        self, enterprise: str, agent: str, birth: Birth, *, codec: str = "json"
    ) -> None: ...

    def on_will(self, enterprise: str, agent: str, will: Will) -> None: ...

    def on_device_state(
        self, enterprise: str, agent: str, device: str, state: DeviceState
    ) -> None: ...

    def on_samples(self, summary: SampleSummary) -> None: ...

    def on_samples_many(self, summaries: Sequence[SampleSummary]) -> None: ...


class _Tx:
    def first_time(self, dev: str, seq: int, ts: int) -> bool:
        return True

    def add(self, lines: list[str]) -> None: ...


def _best(fn: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    codec: Codec = JSON_CODEC
    n = args.messages
    value_sets = [
        {f"p{i}": round(v * 0.37 + i * 1.5, 3) for i in range(args.points)} for v in range(16)
    ]
    ts0 = 1_700_000_000_000
    payloads = [
        json.dumps({"seq": k, "samples": [{"ts": ts0 + k, "values": value_sets[k & 15]}]}).encode()
        for k in range(n)
    ]
    topics = [f"iiot/v1/ent-1/agent-1/dev-{k % 50}/data" for k in range(n)]
    bodies = [codec.encode_sample(ts0 + k, value_sets[k & 15], {}) for k in range(10)]
    proc = MessageProcessor(_Sink(), codec=codec)

    def encode() -> None:
        for k in range(n):
            codec.encode_sample(ts0 + k, value_sets[k & 15], {})

    def pack() -> None:
        for k in range(n):
            codec.pack(k, bodies)

    def decode() -> None:
        for p in payloads:
            codec.decode_data(p)

    def handle() -> None:
        tx = _Tx()
        for t, p in zip(topics, payloads, strict=True):
            proc.handle(tx, t, p)

    print(f"codec {codec.name}: {n} messages of 1 sample x {args.points} points")
    for name, fn in [
        ("agent encode_sample", encode),
        ("publisher pack (10)", pack),
        ("gateway decode_data", decode),
        ("gateway handle()", handle),
    ]:
        s = _best(fn, args.repeat)
        print(f"{name:22s} {s / n * 1e6:7.2f} µs/message  {n / s:>12,.0f} messages/s")


if __name__ == "__main__":
    main()

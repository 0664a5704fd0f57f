"""Golden data messages: each folder holds a payload and what the gateway makes of it.

``payload.json``: the MQTT payload published on ``iiot/v1/ent-1/agent-1/kiln-1/data``.
``expected.lp``: the line protocol written for it, one line per sample; or
``expected_reject.txt``: the reject reason on the first line, then text the reject's
detail must contain. The codec and the contract model must agree on every case.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.ingest import MessageProcessor
from gateway.sink import SampleSummary
from protocols.mqtt.codec import JSON_CODEC
from protocols.mqtt.contract import Birth, ContractError, DeviceState, Will, decode_data_message
from tests.gateway.test_ingest import ListTx

GOLDEN = Path(__file__).parent / "mqtt_golden"
CASES = sorted(p for p in GOLDEN.iterdir() if p.is_dir())
TOPIC = "iiot/v1/ent-1/agent-1/kiln-1/data"


class _Sink:
    """The registry's answers the processor needs: one known agent and device."""

    def check_publisher(self, enterprise: str, agent: str) -> str | None:
        return None if (enterprise, agent) == ("ent-1", "agent-1") else "unknown_agent"

    def device_tags(self, enterprise: str, device: str) -> tuple[str, str] | None:
        return ("cement_kiln", "kiln-rotary-cement")

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


def test_every_case_says_what_it_expects() -> None:
    assert len(CASES) >= 20
    for case in CASES:
        kinds = {p.name for p in case.iterdir()} - {"payload.json"}
        assert kinds in ({"expected.lp"}, {"expected_reject.txt"}), case.name
        assert case.name.startswith("valid_" if "expected.lp" in kinds else "reject_"), case.name


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden_data_message(case: Path) -> None:
    payload = (case / "payload.json").read_bytes()
    tx = ListTx()
    # The cases exercise the wire format with free point names, not the profile's names.
    processor = MessageProcessor(_Sink(), profile_points=lambda _profile: None)
    outcome = processor.handle(tx, TOPIC, payload)
    try:
        model_reason = None
        decode_data_message(payload)
    except ContractError as exc:
        model_reason = exc.reason
    try:
        codec_reason = None
        JSON_CODEC.decode_data(payload)
    except ContractError as exc:
        codec_reason = exc.reason
    assert codec_reason == model_reason
    if (case / "expected.lp").exists():
        assert outcome.reject is None, outcome.detail
        expected = (case / "expected.lp").read_text(encoding="utf-8").splitlines()
        assert tx.lines == expected
        assert model_reason is None
    else:
        reason, *detail = (case / "expected_reject.txt").read_text(encoding="utf-8").splitlines()
        assert (outcome.reject, model_reason) == (reason, reason), outcome.detail
        for text in detail:
            assert text in outcome.detail
        assert tx.lines == []

"""The registry's per-device list of online/offline changes (the device page's history)."""

from __future__ import annotations

from gateway.registry import Registry
from gateway.registry.history import HISTORY_PER_DEVICE
from protocols.mqtt.contract import Birth, DeviceState, Will
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_registry_fixtures import T0, agent_of

registry = _fx.registry
hebei = _fx.hebei


def _changes(reg: Registry, device: str) -> list[tuple[int, bool, str, str]]:
    return [(c.ts, c.online, c.reason, c.source) for c in reg.state_history("hb-steel", device)]


def test_changes_are_kept_newest_first_with_their_reasons(hebei: Registry) -> None:
    agent = agent_of("hb-steel")
    hebei.on_birth("hb-steel", agent, Birth(bdseq=3, ts=T0, devices=[]))
    state = DeviceState(online=False, ts=T0 + 10, reason="modbus timeout after 0.5 s")
    hebei.on_device_state("hb-steel", agent, "dev-06", state)
    # The same state again (an agent repeats it after a reconnect) is not a change.
    hebei.on_device_state("hb-steel", agent, "dev-06", state)
    hebei.on_device_state("hb-steel", agent, "dev-06", DeviceState(online=True, ts=T0 + 20))
    hebei.on_will("hb-steel", agent, Will(bdseq=3))
    newest = _changes(hebei, "dev-06")
    assert newest[:3] == [
        (T0, False, "agent offline", "agent"),  # the registry's clock is T0
        (T0 + 20, True, "", "device"),
        (T0 + 10, False, "modbus timeout after 0.5 s", "device"),
    ]
    # Every device of the agent that went away gets the change, not only the one reported.
    assert _changes(hebei, "dev-01")[0] == (T0, False, "agent offline", "agent")
    assert _changes(hebei, "no-such-device") == []


def test_each_device_keeps_only_its_last_changes(hebei: Registry) -> None:
    agent = agent_of("hb-steel")
    for k in range(HISTORY_PER_DEVICE + 30):
        state = DeviceState(online=k % 2 == 0, ts=T0 + k, reason=f"change {k}")
        hebei.on_device_state("hb-steel", agent, "dev-06", state)
    kept = _changes(hebei, "dev-06")
    assert len(kept) == HISTORY_PER_DEVICE
    assert kept[0][2] == f"change {HISTORY_PER_DEVICE + 29}" and kept[-1][2] == "change 30"
    assert len(hebei.state_history("hb-steel", "dev-06", limit=5)) == 5

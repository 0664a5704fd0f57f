"""Provisioning an agent id that exists: refused unless an admin rotates; keys expire."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gateway.api import create_app
from gateway.config import GatewayConfig
from gateway.registry import Registry
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_api import ADMIN, PLATFORM, make_config
from tests.gateway.test_registry_fixtures import T0

registry = _fx.registry
hebei = _fx.hebei

WEEK_MS = 7 * 86400 * 1000


def _client(reg: Registry, config: GatewayConfig | None = None) -> TestClient:
    return TestClient(create_app(reg, config or make_config(), clock=lambda: T0 / 1000))


@pytest.fixture
def client(hebei: Registry) -> Iterator[TestClient]:
    with _client(hebei) as c:
        yield c


def _key(client: TestClient, **body: object) -> dict[str, object]:
    r = client.post("/api/v1/enterprises/hb-steel/provisioning-keys", json=body, headers=ADMIN)
    assert r.status_code == 201, r.text
    out: dict[str, object] = r.json()
    return out


def _provision(client: TestClient, key: object, agent: str) -> tuple[int, dict[str, object]]:
    r = client.post("/api/v1/provision", json={"key": key, "agent_id": agent})
    return r.status_code, r.json()


def _hash_of(reg: Registry, agent: str) -> str | None:
    return {a: h for a, _e, h in reg.agent_credentials()}.get(agent)


def test_keys_expire_after_seven_days_by_default_or_as_configured(hebei: Registry) -> None:
    with _client(hebei) as client:
        key = _key(client)
        assert key["expires_ms"] == T0 + WEEK_MS and key["allow_rotation"] is False
        assert _key(client, expires_in_s=3600)["expires_ms"] == T0 + 3_600_000
    config = make_config()
    config.api.provisioning_key_expiry = 86400
    with _client(hebei, config) as client:
        assert _key(client)["expires_ms"] == T0 + 86_400_000
    later = Registry(hebei.url, clock=lambda: (T0 + WEEK_MS) / 1000)
    try:
        with _client(later) as client:
            status, body = _provision(client, key["key"], "edge-late")
        assert status == 401 and "expired" in str(body["detail"])
    finally:
        later.close()


def test_an_existing_agent_id_is_refused_without_spending_the_key(
    client: TestClient, hebei: Registry
) -> None:
    key = _key(client, max_uses=2)["key"]
    status, first = _provision(client, key, "edge-1")
    assert status == 200 and first["rotated"] is False
    before = _hash_of(hebei, "edge-1")
    status, body = _provision(client, key, "edge-1")
    assert status == 409
    assert "already provisioned" in str(body["detail"])
    assert "/api/v1/agents/hb-steel/edge-1/rotate" in str(body["detail"])
    assert _hash_of(hebei, "edge-1") == before  # the running agent keeps working
    # The refusal did not spend a use: the key still provisions a second agent.
    assert _provision(client, key, "edge-2")[0] == 200
    assert client.get("/api/v1/enterprises/hb-steel/agent-rotations", headers=PLATFORM).json() == []


def test_an_admin_rotates_an_agent_and_the_rotation_is_audited(
    client: TestClient, hebei: Registry
) -> None:
    key = _key(client)["key"]
    assert _provision(client, key, "edge-1")[0] == 200
    before = _hash_of(hebei, "edge-1")
    url = "/api/v1/agents/hb-steel/edge-1/rotate"
    assert client.post(url).status_code == 401
    assert client.post(url, headers=PLATFORM).status_code == 403
    assert client.post("/api/v1/agents/hb-steel/nobody/rotate", headers=ADMIN).status_code == 404
    assert client.post("/api/v1/agents/hb-glass/edge-1/rotate", headers=ADMIN).status_code == 404
    r = client.post(url, headers=ADMIN)
    assert r.status_code == 200
    creds = r.json()
    assert creds["rotated"] is True and creds["username"] == "edge-1"
    assert len(creds["password"]) >= 24
    assert _hash_of(hebei, "edge-1") not in (None, before)
    audit = client.get("/api/v1/enterprises/hb-steel/agent-rotations", headers=PLATFORM).json()
    assert len(audit) == 1
    entry = audit[0]
    assert (entry["agent"], entry["enterprise"], entry["at_ms"], entry["via"]) == (
        "edge-1",
        "hb-steel",
        T0,
        "api",
    )
    assert entry["by"].startswith("admin sha256:") and "admin-secret" not in entry["by"]


def test_a_key_created_with_allow_rotation_replaces_credentials_audited(
    client: TestClient, hebei: Registry
) -> None:
    plain = _key(client)["key"]
    assert _provision(client, plain, "edge-1")[0] == 200
    rotating = _key(client, allow_rotation=True, max_uses=1)
    before = _hash_of(hebei, "edge-1")
    status, creds = _provision(client, rotating["key"], "edge-1")
    assert status == 200 and creds["rotated"] is True
    assert _hash_of(hebei, "edge-1") != before
    audit = client.get(
        "/api/v1/enterprises/hb-steel/agent-rotations",
        params={"agent": "edge-1"},
        headers=PLATFORM,
    ).json()
    assert [(a["by"], a["via"]) for a in audit] == [(f"key:{rotating['key_id']}", "key")]


def test_a_database_of_the_previous_schema_gains_rotation(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    reg = Registry(url, clock=lambda: T0 / 1000)
    reg.add_enterprise("hb-steel", "Steel", "130102", "C30")
    reg.close()
    with sqlite3.connect(tmp_path / "old.db") as db:
        db.execute("ALTER TABLE provisioning_keys DROP COLUMN allow_rotation")
        db.execute("DROP TABLE agent_rotations")
        # Rotation came with schema step 5: the database is left as step 4 had it.
        db.execute("DELETE FROM schema_version WHERE version >= 5")
    reg = Registry(url, clock=lambda: T0 / 1000)
    try:
        _id, key = reg.create_provisioning_key("hb-steel", allow_rotation=True)
        reg.redeem_provisioning_key(key, "edge-1", "h1")
        agent, rotated = reg.redeem_provisioning_key(key, "edge-1", "h2")
        assert rotated and agent.password_hash == "h2"
        assert [r["via"] for r in reg.list_rotations("hb-steel")] == ["key"]
    finally:
        reg.close()

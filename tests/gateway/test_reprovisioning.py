"""Provisioning an agent id that exists: refused unless an admin rotates; keys expire."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from pydantic import SecretStr

from gateway.api import create_app
from gateway.config import BrokerAuthConfig, GatewayConfig, MqttConfig
from gateway.provisioning import Provisioner, verify_mosquitto_hash
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


def _blocked_broker_config(tmp_path: Path) -> tuple[GatewayConfig, Path]:
    """A config whose broker auth folder is a plain file, so the files cannot be written."""
    folder = tmp_path / "mosquitto"
    _block(folder)
    config = make_config()
    config.mqtt = MqttConfig(username="gateway", password=SecretStr("gw-pass"))
    config.broker_auth = BrokerAuthConfig(password_file=folder / "passwd", acl_file=folder / "acl")
    return config, folder


def _block(folder: Path) -> None:
    if folder.is_dir():
        shutil.rmtree(folder)
    folder.write_text("not a folder\n")


def _unblock(folder: Path) -> None:
    folder.unlink()
    folder.mkdir()


def _provisioning_counter(client: TestClient, kind: str) -> float:
    text = client.get("/metrics", headers=PLATFORM).text
    line = f'iiot_provisioning_total{{kind="{kind}"}} '
    return sum(float(x[len(line) :]) for x in text.splitlines() if x.startswith(line))


def _password_entry(folder: Path, agent: str) -> str:
    lines = (folder / "passwd").read_text().splitlines()
    return next(x.split(":", 1)[1] for x in lines if x.startswith(f"{agent}:"))


def test_unwritable_broker_files_spend_nothing_and_the_same_key_works_after_the_fix(
    hebei: Registry, tmp_path: Path
) -> None:
    config, folder = _blocked_broker_config(tmp_path)
    with _client(hebei, config) as client:
        once = _key(client, max_uses=1)["key"]
        errors_before = _provisioning_counter(client, "file_errors")
        status, body = _provision(client, once, "edge-1")
        assert status == 503
        # The user learns which file could not be written, and that the key is still good.
        assert str(folder / "acl") in str(body["detail"])
        assert "not used" in str(body["detail"])
        assert _provisioning_counter(client, "file_errors") == errors_before + 1
        assert "edge-1" not in [a.id for a in hebei.list_agents()]
        assert _hash_of(hebei, "edge-1") is None

        _unblock(folder)
        status, creds = _provision(client, once, "edge-1")
        assert status == 200, creds
        assert creds["rotated"] is False
        assert verify_mosquitto_hash(str(creds["password"]), _password_entry(folder, "edge-1"))
        assert "user edge-1" in (folder / "acl").read_text()


def test_a_rotation_the_broker_files_miss_keeps_the_old_password_and_no_audit(
    hebei: Registry, tmp_path: Path
) -> None:
    config, folder = _blocked_broker_config(tmp_path)
    _unblock(folder)
    with _client(hebei, config) as client:
        status, first = _provision(client, _key(client)["key"], "edge-1")
        assert status == 200
        rotating = _key(client, allow_rotation=True, max_uses=1)["key"]
        before = _hash_of(hebei, "edge-1")
        _block(folder)

        assert _provision(client, rotating, "edge-1")[0] == 503
        r = client.post("/api/v1/agents/hb-steel/edge-1/rotate", headers=ADMIN)
        assert r.status_code == 503 and str(folder / "acl") in r.json()["detail"]
        # The running agent keeps its password: a later rewrite of the files keeps it too.
        assert _hash_of(hebei, "edge-1") == before
        assert [a.password_hash for a in hebei.list_agents() if a.id == "edge-1"] == [before]
        audit = client.get("/api/v1/enterprises/hb-steel/agent-rotations", headers=PLATFORM)
        assert audit.json() == []

        _unblock(folder)
        status, creds = _provision(client, _key(client)["key"], "edge-2")
        assert status == 200
        assert verify_mosquitto_hash(str(first["password"]), _password_entry(folder, "edge-1"))
        # The rotating key was not spent either.
        status, creds = _provision(client, rotating, "edge-1")
        assert status == 200 and creds["rotated"] is True
        assert verify_mosquitto_hash(str(creds["password"]), _password_entry(folder, "edge-1"))


def test_a_change_whose_commit_fails_leaves_the_files_as_the_database_has_them(
    hebei: Registry, tmp_path: Path
) -> None:
    config, folder = _blocked_broker_config(tmp_path)
    _unblock(folder)
    provisioner = Provisioner(hebei, config)
    first = provisioner.provision(hebei.create_provisioning_key("hb-steel")[1], "edge-1")
    _id, rotating = hebei.create_provisioning_key("hb-steel", allow_rotation=True)

    def commit_fails(_conn: object) -> None:
        raise sa.exc.OperationalError("COMMIT", {}, Exception("database went away"))

    sa.event.listen(hebei._engine, "commit", commit_fails)
    try:
        with pytest.raises(sa.exc.OperationalError):
            provisioner.provision(rotating, "edge-1")
    finally:
        sa.event.remove(hebei._engine, "commit", commit_fails)
    # The files were written before the commit, then put back: the old password works.
    assert verify_mosquitto_hash(str(first["password"]), _password_entry(folder, "edge-1"))
    assert provisioner.provision(rotating, "edge-1")["rotated"] is True

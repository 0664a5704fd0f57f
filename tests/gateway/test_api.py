"""The HTTP API over a populated registry (in-process ASGI client)."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from gateway.api import create_app
from gateway.config import ApiConfig, GatewayConfig, MqttConfig
from gateway.registry import Registry
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_registry_fixtures import T0

ADMIN = {"Authorization": "Bearer admin-secret"}
PLATFORM = {"Authorization": "Bearer platform-secret"}

# Fixtures shared with the other registry/API tests.
registry = _fx.registry
hebei = _fx.hebei


def make_config() -> GatewayConfig:
    return GatewayConfig(
        api=ApiConfig(
            admin_tokens=[SecretStr("admin-secret")],
            platform_tokens=[SecretStr("platform-secret")],
        )
    )


@pytest.fixture
def client(hebei: Registry) -> Iterator[TestClient]:
    app = create_app(hebei, make_config(), clock=lambda: T0 / 1000)
    with TestClient(app) as c:
        yield c


def test_tokens(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/api/v1/ratios").status_code == 401
    assert client.get("/api/v1/ratios", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/api/v1/ratios", headers={"Authorization": "Basic x"}).status_code == 401
    assert client.get("/api/v1/ratios", headers=PLATFORM).status_code == 200
    body = b"device_id,enterprise\nx-1,hb-steel\n"
    csv_h = {"Content-Type": "text/csv"}
    assert client.post("/api/v1/ledger", content=body, headers=csv_h).status_code == 401
    r = client.post("/api/v1/ledger", content=body, headers={**PLATFORM, **csv_h})
    assert r.status_code == 403
    r = client.post("/api/v1/ledger", content=body, headers={**ADMIN, **csv_h})
    assert r.status_code == 200 and r.json()["errors"][0]["reason"].startswith("category")
    assert client.delete("/api/v1/devices/hb-steel/dev-01", headers=PLATFORM).status_code == 403


def test_docs_and_dashboard_are_served(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "工业设备联网率" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_metrics_need_a_token_and_show_registry_counters(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 401
    text = client.get("/metrics", headers=PLATFORM).text
    assert 'iiot_registry{what="devices"} 50.0' in text
    assert 'iiot_registry_events_total{kind="births"}' in text


def test_ratios_endpoint(client: TestClient) -> None:
    r = client.get(
        "/api/v1/ratios",
        params={"group_by": "city", "window": "24h", "as_of": T0},
        headers=PLATFORM,
    )
    assert r.status_code == 200
    data = r.json()
    assert data["overall"]["total"] == 50 and data["overall"]["connected"] == 25
    assert data["window_s"] == 86400 and data["as_of"] == T0
    assert [g["key"] for g in data["groups"]] == ["130100", "130200", "130600", "130900"]
    iso = client.get(
        "/api/v1/ratios",
        params={"group_by": "city", "as_of": "2025-06-15T15:06:40Z"},
        headers=PLATFORM,
    ).json()
    assert iso == data
    # The definitions are part of the API's own documentation.
    doc = client.get("/openapi.json").json()
    assert "last good sample" in doc["paths"]["/api/v1/ratios"]["get"]["description"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"window": "24"}, "window"),
        ({"window": "0h"}, "window"),
        ({"as_of": "last tuesday"}, "as_of"),
        ({"group_by": "planet"}, "group_by"),
        ({"region": "13x"}, "region"),
    ],
)
def test_bad_query_parameters_are_422_naming_them(
    client: TestClient, params: dict[str, str], field: str
) -> None:
    r = client.get("/api/v1/ratios", params=params, headers=PLATFORM)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][-1] == field


def test_ledger_import_through_the_api_is_idempotent(client: TestClient) -> None:
    rows = [
        {"device_id": "new-1", "enterprise": "hb-chem", "family": "boiler"},
        {"device_id": "new-2", "enterprise": "hb-chem", "region": "1309", "family": "kiln"},
        {"device_id": "new-3", "enterprise": "hb-chem", "family": "motor", "category": "x"},
    ]
    h = {**ADMIN, "Content-Type": "application/json"}
    first = client.post("/api/v1/ledger", content=json.dumps(rows), headers=h).json()
    assert (first["accepted"], first["created"], first["rejected"]) == (1, 1, 2)
    assert [e["line"] for e in first["errors"]] == [2, 3]
    assert "region" in first["errors"][0]["reason"]
    second = client.post("/api/v1/ledger", content=json.dumps(rows), headers=h).json()
    assert (second["accepted"], second["created"], second["updated"]) == (1, 0, 1)
    r = client.post(
        "/api/v1/ledger", content=b"<xml/>", headers={**ADMIN, "Content-Type": "application/xml"}
    )
    assert r.status_code == 415
    r = client.post("/api/v1/ledger", content=b"", headers={**ADMIN, "Content-Type": "text/csv"})
    assert r.status_code == 422 and "empty" in r.json()["detail"][0]["msg"]


def test_devices_register_read_decommission(client: TestClient) -> None:
    body = {"device_id": "m-1", "enterprise": "hb-steel", "family": "motor", "name": "主电机"}
    r = client.post("/api/v1/devices", json=body, headers=ADMIN)
    assert r.status_code == 201 and r.json()["category"] == "general_power"
    assert client.post("/api/v1/devices", json=body, headers=ADMIN).status_code == 200
    r = client.post("/api/v1/devices", json={**body, "region": "99"}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "region"]
    r = client.post("/api/v1/devices", json={**body, "enterprise": "ghost"}, headers=ADMIN)
    assert r.status_code == 404
    d = client.get("/api/v1/devices/hb-steel/dev-06", headers=PLATFORM).json()
    assert d["latest"] == {"temperature": 26.0} and d["online"] is True
    assert client.get("/api/v1/devices/hb-steel/zzz", headers=PLATFORM).status_code == 404
    page = client.get(
        "/api/v1/devices",
        params={"enterprise": "hb-steel", "limit": 4, "offset": 8},
        headers=PLATFORM,
    ).json()
    assert page["total"] == 11 and len(page["items"]) == 3
    before = client.get("/api/v1/ratios", params={"as_of": T0}, headers=PLATFORM).json()
    r = client.delete("/api/v1/devices/hb-steel/m-1", headers=ADMIN)
    assert r.status_code == 200 and r.json()["status"] == "decommissioned"
    after = client.get("/api/v1/ratios", params={"as_of": T0}, headers=PLATFORM).json()
    assert after["overall"]["total"] == before["overall"]["total"] - 1
    assert client.delete("/api/v1/devices/hb-steel/zzz", headers=ADMIN).status_code == 404
    offline = client.get("/api/v1/devices/offline", headers=PLATFORM).json()["items"]
    assert {d["enterprise"] for d in offline} == {"hb-machine"}


def test_a_device_repeated_in_one_ledger_upload_is_accounted_for_on_every_row(
    client: TestClient,
) -> None:
    header = "device_id,enterprise,family\n"
    body = header + "".join(f"dup-1,hb-chem,{f}\n" for f in ["boiler"] * 8 + ["kiln"])
    r = client.post("/api/v1/ledger", content=body, headers={**ADMIN, "Content-Type": "text/csv"})
    result = r.json()
    assert r.status_code == 200 and (result["accepted"], result["rejected"]) == (1, 8)
    assert [e["line"] for e in result["errors"]] == list(range(3, 11))
    assert all("repeats line 2" in e["reason"] for e in result["errors"])
    dev = client.get("/api/v1/devices/hb-chem/dup-1", headers=PLATFORM).json()
    assert dev["family"] == "boiler"  # the first row wins; the repeats change nothing


def test_onboarding_enterprise_key_and_provision(client: TestClient) -> None:
    ent = {"id": "hb-glass", "name": "沙河玻璃 Shahe Glass", "region": "130582", "industry": "C30"}
    r = client.post("/api/v1/enterprises", json=ent, headers=ADMIN)
    assert r.status_code == 201 and r.json()["region_label"] == "沙河市 Shahe City"
    assert client.post("/api/v1/enterprises", json=ent, headers=ADMIN).status_code == 200
    r = client.post("/api/v1/enterprises", json={**ent, "industry": "Z1"}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "industry"]
    key = client.post(
        "/api/v1/enterprises/hb-glass/provisioning-keys", json={"max_uses": 1}, headers=ADMIN
    ).json()["key"]
    creds = client.post("/api/v1/provision", json={"key": key, "agent_id": "glass-edge-1"})
    assert creds.status_code == 200
    c = creds.json()
    assert c["username"] == "glass-edge-1" and len(c["password"]) >= 24
    assert c["topic_prefix"] == "iiot/v1/hb-glass/glass-edge-1"
    again = client.post("/api/v1/provision", json={"key": key, "agent_id": "glass-edge-2"})
    assert again.status_code == 401 and "used up" in again.json()["detail"]
    bad = client.post("/api/v1/provision", json={"key": "pk_nope", "agent_id": "x"})
    assert bad.status_code == 401
    hebei = client.app.state.registry  # type: ignore[attr-defined]
    _id, old_key = hebei.create_provisioning_key("hb-glass", expires_ms=T0 - 1)
    expired = client.post("/api/v1/provision", json={"key": old_key, "agent_id": "late-1"})
    assert expired.status_code == 401 and "expired" in expired.json()["detail"]
    agents = client.get("/api/v1/agents", params={"enterprise": "hb-glass"}, headers=PLATFORM)
    assert [a["id"] for a in agents.json()] == ["glass-edge-1"]
    # Another enterprise cannot take that agent id.
    key2 = client.post("/api/v1/enterprises/hb-steel/provisioning-keys", headers=ADMIN).json()[
        "key"
    ]
    taken = client.post("/api/v1/provision", json={"key": key2, "agent_id": "glass-edge-1"})
    assert taken.status_code == 409


def test_connection_report_csv(client: TestClient) -> None:
    r = client.get("/api/v1/reports/connection.csv", params={"as_of": T0}, headers=PLATFORM)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.content.startswith(b"\xef\xbb\xbf")
    rows = list(csv.reader(io.StringIO(r.content.decode("utf-8-sig"))))
    header = rows[0]
    assert "联网设备总量 connected_devices" in header and "企业设备总量 total_devices" in header
    assert header[0] == "企业标识 enterprise_id"
    table = {(row[0], row[5]): row for row in rows[1:]}
    # hb-steel: devices 1,6,...,46; families k%8 → category; reported (k<29) count.
    steel_kilns = [k for k in range(1, 50, 5) if k % 8 in (0, 1)]
    row = table[("hb-steel", "high_energy_process")]
    assert row[1] == "唐山钢铁 Tangshan Steel" and row[2] == "130203" and row[4] == "C31"
    assert row[3] == "路北区 Lubei District"  # the county's GB/T 2260 name, not only its code
    assert row[6] == "高耗能流程行业设备"
    assert int(row[8]) == len(steel_kilns)
    assert int(row[7]) == len([k for k in steel_kilns if k < 25])
    assert sum(int(r[8]) for r in rows[1:]) == 50
    assert sum(int(r[7]) for r in rows[1:]) == 25
    assert len(rows) - 1 == len(table)


def test_malformed_admin_bodies_are_refused_not_a_server_error(client: TestClient) -> None:
    json_h = {**ADMIN, "Content-Type": "application/json"}
    deep = client.post("/api/v1/ledger", content=b"[" * 100_000, headers=json_h)
    assert deep.status_code == 422 and "nested too deeply" in deep.json()["detail"][0]["msg"]
    rows = [
        {"device_id": "x-1", "enterprise": "hb-steel", "family": ["kiln"]},
        {"device_id": "x-2", "enterprise": "hb-steel", "family": "kiln", "category": {"a": 1}},
        {"device_id": "x-3", "enterprise": "hb-steel", "family": "kiln", "name": "\ud800"},
        {"device_id": "\ud800", "enterprise": "hb-steel", "family": "kiln"},
        {"device_id": "x-5", "enterprise": "hb-steel", "family": "kiln", "name": "a\x00"},
    ]
    r = client.post("/api/v1/ledger", content=json.dumps(rows), headers=json_h)
    assert r.status_code == 200
    out = r.json()
    assert out["accepted"] == 0 and out["rejected"] == 5
    reasons = [e["reason"] for e in out["errors"]]
    assert reasons[0].startswith("unknown family") and reasons[1].startswith("unknown category")
    assert reasons[2].startswith("name is not valid Unicode") and "device_id" in reasons[3]
    assert reasons[4] == "name contains a NUL character"
    assert out["errors"][3]["device_id"] == "\\ud800"

    lone = '"name": "\\ud800"'
    dev = '{"device_id": "x-6", "enterprise": "hb-steel", "family": "kiln", ' + lone + "}"
    ent = '{"id": "hb-new", "region": "130102", "industry": "C30", ' + lone + "}"
    for path, body in [("/api/v1/devices", dev), ("/api/v1/enterprises", ent)]:
        r = client.post(path, content=body, headers=json_h)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"], path
    r = client.post(
        "/api/v1/devices",
        json={"device_id": "x-7", "enterprise": "hb-steel", "family": "kiln", "name": "a\x00"},
        headers=ADMIN,
    )
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"]
    # Nothing half-written: the registry still persists and counts 50 devices.
    registry = client.app.state.registry  # type: ignore[attr-defined]
    registry.flush()
    assert registry.counters["flush_errors"] == 0
    assert client.get("/api/v1/devices", headers=PLATFORM).json()["total"] == 50


def test_an_agent_may_not_take_the_gateways_mqtt_username(
    hebei: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config()
    config.mqtt = MqttConfig(username="iiot-gateway", password=SecretStr("gw-pass"))
    with TestClient(create_app(hebei, config, clock=lambda: T0 / 1000)) as client:
        key = client.post(
            "/api/v1/enterprises/hb-steel/provisioning-keys", json={"max_uses": 2}, headers=ADMIN
        ).json()["key"]
        r = client.post("/api/v1/provision", json={"key": key, "agent_id": "iiot-gateway"})
        assert r.status_code == 409 and "gateway's own MQTT username" in r.json()["detail"]
        # The refusal did not spend a use: the key still provisions two agents.
        assert client.post("/api/v1/provision", json={"key": key, "agent_id": "edge-1"}).is_success
        # Re-provisioning an agent (a replaced box) needs a key that allows rotation,
        # and leaves a warning.
        refused = client.post("/api/v1/provision", json={"key": key, "agent_id": "edge-1"})
        assert refused.status_code == 409 and "already provisioned" in refused.json()["detail"]
        key = client.post(
            "/api/v1/enterprises/hb-steel/provisioning-keys",
            json={"allow_rotation": True},
            headers=ADMIN,
        ).json()["key"]
        with caplog.at_level(logging.WARNING, logger="iiot.gateway.registry"):
            again = client.post("/api/v1/provision", json={"key": key, "agent_id": "edge-1"})
        assert again.status_code == 200 and again.json()["rotated"] is True
        warned = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert [(getattr(r, "agent", None), getattr(r, "enterprise", None)) for r in warned] == [
            ("edge-1", "hb-steel")
        ]

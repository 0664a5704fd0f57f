"""/health/live and /health/ready against a real broker and a real victoria-metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from gateway.config import BrokerAuthConfig, GatewayConfig, HealthConfig, MqttConfig
from gateway.provisioning import Provisioner
from gateway.registry import Registry
from gateway.service import Gateway
from iiot_common.localservers import Mosquitto, VictoriaMetrics
from tests.gateway.test_ingest import Publisher, gateway_config, sample
from tests.waiting import wait_until


def _get(gw: Gateway, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.api_port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _with_agent(config: GatewayConfig) -> GatewayConfig:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    with Registry(config.registry_url) as reg:
        reg.add_enterprise("ent-1", "Test Works", "130102", "C30")
        reg.add_agent("ent-1", "agent-1", None)
    config.api.port = 0
    config.health = HealthConfig(writer_failing_for=1.0, outbox_backlog_age=3.0)
    return config


@pytest.fixture
def running(tmp_path: Path, mosquitto: Mosquitto, victoria: VictoriaMetrics) -> Iterator[Gateway]:
    gw = Gateway(_with_agent(gateway_config(tmp_path, mosquitto, victoria)))
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def test_ready_when_broker_and_database_answer(running: Gateway) -> None:
    assert _get(running, "/health/live") == (200, {"status": "ok"})
    wait_until(lambda: _get(running, "/health/ready")[0] == 200, what="ready")
    assert _get(running, "/health/ready") == (200, {"status": "ready", "reasons": []})
    assert _get(running, "/health")[1]["status"] == "ok"


def test_not_ready_while_victoria_metrics_is_down_past_the_threshold(
    running: Gateway, mosquitto: Mosquitto, victoria: VictoriaMetrics, tmp_path: Path
) -> None:
    wait_until(lambda: _get(running, "/health/ready")[0] == 200, what="ready")
    victoria.stop()
    pub = Publisher(mosquitto.url)
    try:
        pub.data("kiln-1", 1, [sample(1, temperature=812.5)])
    finally:
        pub.close()
    wait_until(lambda: _get(running, "/health/ready")[0] == 503, timeout=30, what="not ready")
    status, body = _get(running, "/health/ready")
    assert status == 503 and body["status"] == "not ready"
    assert any(r.startswith("database writer failing for") for r in body["reasons"]), body
    # Down is not dead: the process still serves, so it must not be restarted.
    assert _get(running, "/health/live") == (200, {"status": "ok"})
    assert _get(running, "/health")[0] == 200

    again = VictoriaMetrics(tmp_path / "victoria", port=victoria.port).start()
    try:
        wait_until(lambda: _get(running, "/health/ready")[0] == 200, timeout=60, what="ready again")
    finally:
        again.stop()


def test_not_ready_while_the_broker_refuses_the_gateways_credentials(tmp_path: Path) -> None:
    pw, acl = tmp_path / "auth" / "passwd", tmp_path / "auth" / "acl"
    with Registry(f"sqlite:///{tmp_path / 'seed.db'}") as seed:
        Provisioner(
            seed,
            GatewayConfig(
                mqtt=MqttConfig(username="gateway", password=SecretStr("right-password")),
                broker_auth=BrokerAuthConfig(password_file=pw, acl_file=acl),
            ),
        ).sync()
    (tmp_path / "mq").mkdir()
    broker = Mosquitto(tmp_path / "mq", password_file=pw, acl_file=acl).start()
    try:
        config = _with_agent(gateway_config(tmp_path, broker, None))
        config.mqtt.username = "gateway"
        config.mqtt.password = SecretStr("wrong-password")
        gw = Gateway(config, connect_timeout=1.0)
        gw.start()
        try:
            assert _get(gw, "/health/live") == (200, {"status": "ok"})
            wait_until(lambda: _get(gw, "/health/ready")[0] == 503, what="not ready")
            wait_until(
                lambda: "Not authorized" in " ".join(_get(gw, "/health/ready")[1]["reasons"]),
                what="the broker's refusal as the reason",
            )
            status, body = _get(gw, "/health/ready")
            assert status == 503 and body["status"] == "not ready"
            assert body["reasons"] == ["broker refused the ingest's connection: Not authorized"]
        finally:
            gw.stop()
    finally:
        broker.stop()

"""The dashboard rendered by headless Chromium against the API served by uvicorn."""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from gateway.api import create_app
from gateway.ratios import Snapshotter
from gateway.registry import Registry
from iiot_common.localservers import free_port, require, wait_port
from tests.gateway import test_registry_fixtures as _fx
from tests.gateway.test_api import make_config
from tests.gateway.test_registry_fixtures import T0

HOUR = 3600_000

# Fixtures shared with the other registry/API tests.
registry = _fx.registry
hebei = _fx.hebei
hebei_makers = _fx.hebei_makers


@pytest.fixture
def served(hebei: Registry) -> Iterator[str]:
    yield from _serve(hebei)


@pytest.fixture
def served_makers(hebei_makers: Registry) -> Iterator[str]:
    yield from _serve(hebei_makers)


def _serve(registry: Registry) -> Iterator[str]:
    snap = Snapshotter(registry, 3600, lambda _lines: None)
    for h in (3, 2, 1, 0):
        snap.snapshot_once(T0 - h * HOUR)
    app = create_app(registry, make_config(), clock=lambda: T0 / 1000)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_port(port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _chromium(tmp_path: Path, url: str, *extra: str) -> str:
    binary = require("chromium", "chromium")
    done = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--virtual-time-budget=5000",
            *extra,
            url,
        ],
        capture_output=True,
        timeout=90,
        check=False,
    )
    return done.stdout.decode("utf-8", errors="replace")


def test_dashboard_renders_ratios_and_charts(served: str, tmp_path: Path) -> None:
    dom = _chromium(tmp_path, f"{served}/#token=platform-secret", "--dump-dom")
    # Overall ratio as big numbers: 25 of 50 connected, 7 of 50 online.
    assert re.search(r'id="ratio-connected"[^>]*>50\.0%<', dom)
    assert re.search(r'id="ratio-online"[^>]*>14\.0%<', dom)
    city = dom.split('id="chart-city"', 1)[1].split("</svg>", 1)[0]
    category = dom.split('id="chart-category"', 1)[1].split("</svg>", 1)[0]
    assert city.count('class="bar"') == 4 + 1  # four cities and the legend swatch
    assert "石家庄市 Shijiazhuang" in city and "保定市 Baoding" in city
    assert category.count('class="bar"') == 4 + 1
    assert "新能源设备" in category and "New-energy equipment" in category
    trend = dom.split('id="chart-trend"', 1)[1].split("</svg>", 1)[0]
    assert 'class="connected"' in trend
    offline = dom.split('id="offline"', 1)[1].split("</table>", 1)[0]
    assert "石家庄机械 Shijiazhuang Machinery" in offline and "agent offline" in offline
    assert "令牌无效" not in dom


def _cells(dom: str, key: str) -> list[str]:
    row = dom.split(f'data-key="{key}"', 1)[1].split("</tr>", 1)[0]
    return [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]


def test_dashboard_shows_products_and_enterprises_on_the_cloud(
    served_makers: str, tmp_path: Path
) -> None:
    dom = _chromium(tmp_path, f"{served_makers}/#token=platform-secret", "--dump-dom")
    # Equipment as before; 5 of the 12 products made are connected.
    assert re.search(r'id="ratio-connected"[^>]*>50\.0%<', dom)
    assert re.search(r'id="ratio-products"[^>]*>41\.7%<', dom)
    assert re.search(r'id="on-cloud"[^>]*>5<', dom)
    assert "上云企业 5 家 / 登记企业 7 家 (71.4%)" in dom
    # The province's 2025 target of 10: half done.
    assert "2025 年目标 target 10 家 · 完成 progress 50.0%" in dom
    regions = dom.split('id="regions"', 1)[1].split("</table>", 1)[0]
    assert _cells(regions, "130100") == [
        "石家庄市 Shijiazhuang",
        "50.0%  10/20 台",  # cement and machinery: 5 each within 24 h
        "0.0%  0/4 台",
        "2/3 家",
        "4 家",
        "50.0%",
    ]
    # Qinhuangdao: a compressor maker with products only, not on the cloud.
    assert _cells(regions, "130300")[1:] == ["—", "62.5%  5/8 台", "0/1 家", "2 家", "0.0%"]
    # Xingtai has a target and no enterprise yet.
    assert _cells(regions, "130500")[1:] == ["—", "—", "0/0 家", "1 家", "0.0%"]
    assert "令牌无效" not in dom


def test_dashboard_reports_a_bad_token(served: str, tmp_path: Path) -> None:
    dom = _chromium(tmp_path, f"{served}/#token=wrong", "--dump-dom")
    assert "Token not accepted" in dom


def test_docs_list_the_operations_without_internet(served: str, tmp_path: Path) -> None:
    # Every host name but loopback fails to resolve: a page that needs a CDN stays blank.
    dom = _chromium(
        tmp_path,
        f"{served}/docs",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--dump-dom",
    )
    paths = set(re.findall(r'data-path="([^"]+)"', dom))
    for path in ("/api/v1/ratios", "/api/v1/devices", "/api/v1/provision", "/health/ready"):
        assert path in paths, f"{path} not listed on /docs"
    # The description is rendered by Swagger UI from /openapi.json, not in the page itself.
    assert "Device registry, onboarding and connection ratios" in dom

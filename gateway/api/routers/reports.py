"""Reports for download: the connection table per enterprise and category."""

from __future__ import annotations

import csv
import io
from typing import Annotated

from fastapi import APIRouter, Query, Response

from gateway.api.deps import (
    AUTH_RESPONSES,
    READ,
    NowMs,
    RegistryDep,
    parse_time,
    parse_window_param,
)
from gateway.ratios import enterprise_category_table, ratio
from gateway.registry.codes import CATEGORY_LABELS, region_label

__all__ = ["CONNECTION_HEADER", "router"]

router = APIRouter(tags=["ratios"], dependencies=[READ])

# The programmes' form: one row per enterprise and category, Chinese and English headers.
CONNECTION_HEADER = [
    "企业标识 enterprise_id",
    "企业名称 enterprise_name",
    "行政区划 region",
    "地区 region_name",
    "行业 industry",
    "设备类别 category",
    "类别名称 category_name",
    "联网设备总量 connected_devices",
    "企业设备总量 total_devices",
    "设备联网率 connection_ratio",
    "联网产品总量 connected_products",
    "生产产品总量 total_products",
    "产品联网率 product_connection_ratio",
]


@router.get(
    "/api/v1/reports/connection.csv",
    response_class=Response,
    responses={
        200: {"content": {"text/csv": {"schema": {"type": "string"}}}},
        **AUTH_RESPONSES,
    },
)
def connection_report(
    registry: RegistryDep,
    now_ms: NowMs,
    window: Annotated[str, Query(max_length=16)] = "24h",
    as_of: Annotated[str | None, Query(max_length=40)] = None,
) -> Response:
    """Per enterprise and category: connected and total production equipment and its
    ratio, then connected and total products the enterprise made and their ratio (UTF-8
    with BOM; the form's Chinese headers)."""
    window_s = parse_window_param(window, "window")
    as_of_ms = parse_time(as_of, "as_of") if as_of is not None else now_ms
    rows = enterprise_category_table(registry, window_s=window_s, as_of_ms=as_of_ms)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(CONNECTION_HEADER)
    for r in rows:
        zh = CATEGORY_LABELS.get(r["category"], r["category"]).split(" ")[0]
        w.writerow(
            [
                r["enterprise"],
                r["name"],
                r["region"],
                region_label(r["region"]) if r["region"] else "",
                r["industry"],
                r["category"],
                zh,
                r["connected"],
                r["total"],
                f"{ratio(r['connected'], r['total'], 4):.4f}",
                r["products_connected"],
                r["products_total"],
                f"{ratio(r['products_connected'], r['products_total'], 4):.4f}",
            ]
        )
    body = "\ufeff" + buf.getvalue()
    return Response(
        body.encode("utf-8"),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="connection.csv"'},
    )

"""The provincial platform's views: reconciliation, grades, report verification and the
devices behind a stored report, the drill-down's tables as CSV and Excel, and a
device's recent telemetry."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, Literal

import xlsxwriter
from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from gateway.api.deps import (
    AUTH_RESPONSES,
    NOT_FOUND,
    READ,
    Ident,
    NowMs,
    QIdent,
    RegistryDep,
    invalid,
    parse_time,
    parse_window_param,
)
from gateway.api.routers.reports import CONNECTION_HEADER
from gateway.provincial import (
    DEFINITIONS_VERSION,
    EVIDENCE_HEADER,
    Rubric,
    evidence_rows,
    grade_enterprises,
    load_evidence,
    reconcile,
    verify_report,
)
from gateway.quality import QUALITY_DEFINITION
from gateway.ratios import (
    DEFINITIONS,
    Grouping,
    compute_ratios,
    enterprise_category_table,
    parse_as_of,
    ratio,
)
from gateway.registry.codes import (
    CATEGORY_LABELS,
    industry_label,
    region_label,
    region_prefix_range,
)
from gateway.telemetry import TelemetryAnswer, TelemetryReader
from iiot_common.identifier import IDENTIFIER_PATTERN

__all__ = ["router"]

router = APIRouter(tags=["provincial"], responses=AUTH_RESPONSES, dependencies=[READ])

Table = tuple[list[str], list[list[Any]]]
Report = Literal["connection", "ratios", "reconciliation", "grades", "telemetry"]
Format = Literal["csv", "xlsx"]
_MAX_TELEMETRY_HOURS = 24
_MAX_EXPORT_ROWS = 1_000_000

_RECONCILIATION_DOC = (
    "Ledger reconciliation (台账核对) at `as_of`: **not_in_ledger**, devices that report "
    "(an agent's birth announced them) but no ledger row lists; **never_seen**, ledger "
    "devices that never sent anything; **not_seen_in_window**, devices seen before but "
    "not within the window; **duplicate_serials**, a serial number (the ledger's "
    "optional `serial` column) claimed by more than one enterprise. Decommissioned "
    "devices are left out. Each list has at most `limit` entries; `counts` counts them all."
)
_GRADES_DOC = (
    "Graded evaluation (分级分类评价): each enterprise's production equipment against "
    "the rubric's levels (the gateway config's `provincial.rubric_file`, default "
    "`gateway/rubrics/default.yaml`). The grade is the highest level whose criteria, and "
    "those of every level below, are met; `levels` gives each criterion's required and "
    "actual value. `control_in_use` counts remote configurations the agent reported "
    "applied and writes that were read back (status ok), up to `as_of`.\n\n" + QUALITY_DEFINITION
)
_VERIFY_DOC = (
    "Verifies the stored ratio snapshot at or before `as_of` from its **evidence**: the "
    "devices it counted, each with its ledger fields (enterprise, region, industry, "
    "category, family, kind, decommissioned), its last good sample, whether it was "
    "online and whether it counted as quality_connected, kept with the snapshot. Three "
    "answers:\n\n"
    "1. **Integrity** — `evidence.intact`: the evidence hashes to the snapshot's stored "
    "`registry_version`.\n"
    "2. **Reproducible** — the evidence counted again under the current definitions, by "
    "the same arithmetic as the live ratios, gives every stored number (total, connected, "
    "online and quality_connected, equipment and products, of every group); `differences` "
    "names each that "
    "does not (`group_by`, `key`, `field`, `stored`, `recomputed`). `reproducible` is "
    "true when the evidence is intact and there is no difference; "
    "`definitions_unchanged` says whether the definitions are those of the snapshot. "
    "`quality.status` is `recorded`, or `not_recorded` for a snapshot taken before the "
    "quality counts were kept: its quality_connected is null and not compared.\n"
    "3. **Registry changes** — `registry_changes` compares the registry read now for the "
    "same `as_of` with the evidence: devices `added`, `removed`, `regrouped` (region, "
    "industry, category, family or kind), `decommissioned_changed`, "
    "`connection_changed` (counted connected differently, e.g. a device that reported "
    "again since) and `reported_since`, with examples; `registry_unchanged` is true "
    "when none but `reported_since` is non-zero. A changed registry does not make a "
    "report irreproducible.\n\n"
    "Evidence is kept for a while (the gateway config's `provincial.evidence_retention_"
    "days`, and one snapshot a day for `provincial.evidence_daily_retention_days`); "
    "`evidence.status` is then `pruned` (or `not_recorded` for a snapshot taken before "
    "evidence was kept), and `reproducible`, `registry_unchanged`, `registry_changes` and "
    "`quality` are null: nothing is recomputed without it."
)
_DEVICES_DOC = (
    "The detail list (明细) behind the stored report at or before `as_of` (Unix ms or ISO "
    "8601): every device the snapshot counted, from its evidence, as CSV (UTF-8 with "
    "BOM) — enterprise, device, region, industry, category, family, kind, "
    "decommissioned, last good sample, connected, online and quality_connected (empty: "
    "not recorded, in a snapshot taken before it was) at the snapshot. Optional "
    "`enterprise` and `region` (a code prefix) filters. The first row names the "
    "snapshot, its `registry_version` and whether the evidence is intact. 404 when no "
    "snapshot is stored at or before `as_of`; 410 when its evidence was pruned (or never "
    "kept); 500 when it cannot be read."
)


def _as_of(as_of: str | None, now_ms: int) -> int:
    return parse_time(as_of, "as_of") if as_of is not None else now_ms


def _check_scope(region: str | None) -> None:
    if region is not None:
        try:
            region_prefix_range(region)
        except ValueError as exc:
            raise invalid("query", "region", str(exc)) from None


def _rubric(request: Request) -> Rubric:
    rubric: Rubric = request.app.state.rubric
    return rubric


@router.get("/api/v1/reconciliation", description=_RECONCILIATION_DOC)
def reconciliation(
    registry: RegistryDep,
    now_ms: NowMs,
    window: Annotated[str, Query(max_length=16)] = "24h",
    as_of: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=_MAX_EXPORT_ROWS, description="Per list.")] = 1000,
) -> Response:
    result = reconcile(
        registry,
        as_of_ms=_as_of(as_of, now_ms),
        window_s=parse_window_param(window, "window"),
        limit=limit,
    )
    return _json(result)


@router.get("/api/v1/grades", description=_GRADES_DOC)
def grades(
    request: Request,
    registry: RegistryDep,
    now_ms: NowMs,
    window: Annotated[str, Query(max_length=16)] = "24h",
    as_of: Annotated[str | None, Query(max_length=40)] = None,
    region: Annotated[str | None, Query(max_length=6)] = None,
    industry: Annotated[str | None, Query(max_length=8)] = None,
) -> Response:
    _check_scope(region)
    result = grade_enterprises(
        registry,
        _rubric(request),
        as_of_ms=_as_of(as_of, now_ms),
        window_s=parse_window_param(window, "window"),
        region=region,
        industry=industry,
    )
    return _json(result)


# Verifying a report or reading its devices decodes and counts its whole evidence (about
# 0.5 GB for a moment at 10⁶ devices): one at a time, the others answered 503 after a wait.
_HEAVY = threading.BoundedSemaphore(1)
_HEAVY_WAIT_S = 30.0


@contextlib.contextmanager
def _heavy_read() -> Iterator[None]:
    if not _HEAVY.acquire(timeout=_HEAVY_WAIT_S):
        raise HTTPException(
            503,
            detail="another report is being verified or exported; try again shortly",
            headers={"Retry-After": "30"},
        )
    try:
        yield
    finally:
        _HEAVY.release()


@router.get("/api/v1/reports/verify", description=_VERIFY_DOC, responses=NOT_FOUND)
def verify(
    registry: RegistryDep,
    now_ms: NowMs,
    as_of: Annotated[str | None, Query(max_length=40)] = None,
) -> Response:
    with _heavy_read():
        result = verify_report(registry, _as_of(as_of, now_ms))
    if result is None:
        raise HTTPException(404, detail="no stored snapshot at or before as_of")
    return _json(result)


@router.get(
    "/api/v1/reports/{as_of}/devices",
    description=_DEVICES_DOC,
    response_class=Response,
    responses={
        **NOT_FOUND,
        410: {"description": "The snapshot's evidence was pruned or never kept."},
        200: {"content": {"text/csv": {"schema": {"type": "string"}}}},
    },
)
def report_devices(
    as_of: Annotated[str, Path(max_length=40)],
    registry: RegistryDep,
    enterprise: str | None = QIdent,
    region: Annotated[str | None, Query(max_length=6)] = None,
) -> Response:
    try:
        as_of_ms = parse_as_of(as_of)
    except ValueError as exc:
        raise invalid("path", "as_of", str(exc)) from None
    _check_scope(region)
    audit = registry.snapshot_audit_at(as_of_ms)
    if audit is None:
        raise HTTPException(404, detail="no stored snapshot at or before as_of")
    with _heavy_read():
        ev, info = load_evidence(registry, audit)
    if info["status"] == "unreadable":
        raise HTTPException(500, detail=f"snapshot {audit['ts_ms']}: {info['detail']}")
    if ev is None:
        raise HTTPException(410, detail=f"snapshot {audit['ts_ms']}: {info['detail']}")
    title = (
        f"devices snapshot_ts={audit['ts_ms']} window_s={audit['window_s']} "
        f"registry_version={audit['registry_version']} evidence_intact="
        f"{str(info['intact']).lower()} definitions_version={audit['definitions_version']}"
        + "".join(f" {k}={v}" for k, v in {"enterprise": enterprise, "region": region}.items() if v)
    )
    rows = evidence_rows(ev, registry.enterprise_names(), enterprise=enterprise, region=region)
    return StreamingResponse(
        _csv_chunks([[title], EVIDENCE_HEADER], rows),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="devices-{audit["ts_ms"]}.csv"'},
    )


def _csv_chunks(head: Sequence[Sequence[Any]], rows: Iterator[list[Any]]) -> Iterator[bytes]:
    """CSV in pieces of about 10⁴ rows, so 10⁶ devices never sit in memory as one text."""
    buf = io.StringIO()
    buf.write("\ufeff")
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerows(head)
    for k, row in enumerate(rows, start=1):
        writer.writerow(row)
        if k % 10_000 == 0:
            yield buf.getvalue().encode("utf-8")
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue().encode("utf-8")


@router.get("/api/v1/definitions")
def definitions() -> dict[str, str]:
    """The definitions the numbers follow, and their version (a hash of the text)."""
    return {
        "version": DEFINITIONS_VERSION,
        "ratios": DEFINITIONS,
        "quality": QUALITY_DEFINITION,
    }


_TELEMETRY_DOC = (
    "The device's messages of the last `hours` (latest values of each, oldest first), its "
    "state changes since the gateway started and the quality gate's verdict over the last "
    "24 h. `source` says where the messages come from: `victoria-metrics` (the gateway "
    "config's `telemetry.source`; every message the writer stored, whichever gateway "
    "instance received it; at most `telemetry.max_points`, the latest, and "
    "`capped_from_ms` then says where they start) or `memory` (this instance's bounded "
    "window: only the messages it received, empty after a restart), with the reason when "
    "victoria-metrics failed (`memory (victoria-metrics unreachable: ...)`)."
)


@router.get(
    "/api/v1/devices/{enterprise}/{device_id}/telemetry",
    responses=NOT_FOUND,
    description=_TELEMETRY_DOC,
)
def telemetry(
    request: Request,
    enterprise: Ident,
    device_id: Ident,
    registry: RegistryDep,
    now_ms: NowMs,
    hours: Annotated[float, Query(gt=0, le=_MAX_TELEMETRY_HOURS)] = 6,
) -> Response:
    key = (enterprise, device_id)
    if registry.get_device(enterprise, device_id) is None:
        raise HTTPException(404, detail=f"device {device_id!r} of {enterprise!r} not found")
    window = registry.quality
    from_ms = now_ms - int(hours * 3600_000)
    answer = _read_telemetry(request, registry, key, from_ms, now_ms)
    return _json(
        {
            "enterprise": enterprise,
            "device_id": device_id,
            "from_ms": from_ms,
            "source": answer.source,
            "capped_from_ms": answer.capped_from_ms,
            "points": answer.points,
            "states": window.states(key),
            "quality": window.judge(key, now_ms, 86400_000),
        }
    )


def _read_telemetry(
    request: Request, registry: Any, key: tuple[str, str], from_ms: int, to_ms: int
) -> TelemetryAnswer:
    reader: TelemetryReader = request.app.state.telemetry
    return reader.read(key, from_ms, to_ms, lambda since: registry.quality.telemetry(key, since))


def _json(result: dict[str, Any]) -> Response:
    body = json.dumps(result, ensure_ascii=False, separators=(",", ":"))
    return Response(body.encode(), media_type="application/json")


@router.get(
    "/api/v1/reports/{report}.{fmt}",
    response_class=Response,
    responses={
        200: {
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": {
                    "schema": {"type": "string", "format": "binary"}
                },
            }
        },
    },
)
def report_file(
    report: Report,
    fmt: Format,
    request: Request,
    registry: RegistryDep,
    now_ms: NowMs,
    window: Annotated[str, Query(max_length=16)] = "24h",
    as_of: Annotated[str | None, Query(max_length=40)] = None,
    group_by: Grouping | None = None,
    enterprise: str | None = QIdent,
    # Its own Query: FastAPI names a shared parameter object after its first use.
    device: Annotated[str | None, Query(pattern=IDENTIFIER_PATTERN, max_length=64)] = None,
    region: Annotated[str | None, Query(max_length=6)] = None,
    industry: Annotated[str | None, Query(max_length=8)] = None,
    category: Annotated[str | None, Query(max_length=32)] = None,
    hours: Annotated[float, Query(gt=0, le=_MAX_TELEMETRY_HOURS)] = 6,
) -> Response:
    """A view's table for download, with the view's filters: ``connection`` (per
    enterprise and category; ``connection.csv`` itself is the form's report), ``ratios``
    (the drill-down's groups, ``group_by``), ``reconciliation``, ``grades`` or
    ``telemetry`` (one device's recent messages: ``enterprise``, ``device``, ``hours``); ``csv``
    (UTF-8 with BOM) or ``xlsx``. The file's first rows name the filters and versions."""
    if report == "connection" and fmt == "csv":
        raise HTTPException(404, detail="connection.csv is served by the form's report")
    _check_scope(region)
    window_s = parse_window_param(window, "window")
    as_of_ms = _as_of(as_of, now_ms)
    scope = {"enterprise": enterprise, "region": region, "industry": industry}
    notes: dict[str, str] = {}
    builders: dict[str, Callable[[], Table]] = {
        "connection": lambda: _connection_table(registry, window_s, as_of_ms, scope, category),
        "ratios": lambda: _ratios_table(registry, group_by, window_s, as_of_ms, scope, category),
        "reconciliation": lambda: _reconciliation_table(registry, window_s, as_of_ms),
        "grades": lambda: _grades_table(
            registry, _rubric(request), window_s, as_of_ms, region, industry
        ),
        "telemetry": lambda: _telemetry_table(
            request, registry, (enterprise, device), now_ms, hours, notes
        ),
    }
    try:
        header, rows = builders[report]()
    except ValueError as exc:
        raise invalid("query", "region", str(exc)) from None
    title = [
        f"{report} as_of={as_of_ms} window_s={window_s} definitions_version={DEFINITIONS_VERSION}"
        + "".join(
            f" {k}={v}"
            for k, v in {**scope, "category": category, "group_by": group_by, **notes}.items()
            if v
        )
    ]
    if fmt == "csv":
        return _csv_response(report, [title, header, *rows])
    return _xlsx_response(report, title[0], header, rows)


def _csv_response(name: str, rows: Sequence[Sequence[Any]]) -> Response:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows(rows)
    return Response(
        ("\ufeff" + buf.getvalue()).encode("utf-8"),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'},
    )


def _xlsx_response(name: str, title: str, header: list[str], rows: list[list[Any]]) -> Response:
    buf = io.BytesIO()
    book = xlsxwriter.Workbook(buf, {"in_memory": True, "strings_to_numbers": False})
    sheet = book.add_worksheet(name[:31])
    bold = book.add_format({"bold": True})
    sheet.write_string(0, 0, title)
    sheet.write_row(1, 0, header, bold)
    for r, row in enumerate(rows, start=2):
        for c, value in enumerate(row):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                sheet.write_number(r, c, value)
            else:
                sheet.write_string(r, c, "" if value is None else str(value))
    sheet.freeze_panes(2, 0)
    book.close()
    return Response(
        buf.getvalue(),
        media_type="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        headers={"Content-Disposition": f'attachment; filename="{name}.xlsx"'},
    )


def _connection_table(
    registry: Any, window_s: int, as_of_ms: int, scope: dict[str, str | None], category: str | None
) -> Table:
    lo, hi = region_prefix_range(scope["region"]) if scope["region"] else (0, 10**6)
    prefix = (scope["industry"] or "").strip().upper()
    rows = []
    for r in enterprise_category_table(registry, window_s=window_s, as_of_ms=as_of_ms):
        if scope["enterprise"] and r["enterprise"] != scope["enterprise"]:
            continue
        if not r["region"] or not lo <= int(r["region"]) < hi:
            continue
        if not r["industry"].upper().startswith(prefix) or (category and r["category"] != category):
            continue
        rows.append(
            [
                r["enterprise"],
                r["name"],
                r["region"],
                region_label(r["region"]),
                r["industry"],
                r["category"],
                CATEGORY_LABELS.get(r["category"], r["category"]).split(" ")[0],
                r["connected"],
                r["total"],
                ratio(r["connected"], r["total"], 4),
                r["products_connected"],
                r["products_total"],
                ratio(r["products_connected"], r["products_total"], 4),
            ]
        )
    return CONNECTION_HEADER, rows


def _ratios_table(
    registry: Any,
    group_by: str | None,
    window_s: int,
    as_of_ms: int,
    scope: dict[str, str | None],
    category: str | None,
) -> Table:
    header = [
        "分组 key",
        "名称 label",
        "联网设备 connected",
        "数据达标 quality_connected",
        "在线 online",
        "设备总量 total",
        "联网率 ratio",
        "达标率 quality_ratio",
        "在线率 online_ratio",
    ]
    result = compute_ratios(
        registry,
        group_by,
        window_s=window_s,
        as_of_ms=as_of_ms,
        enterprise=scope["enterprise"],
        region=scope["region"],
        industry=scope["industry"],
        category=category,
    )
    groups = [*result["groups"], result["overall"]]
    fields = ("connected", "quality_connected", "online", "total", "ratio", "quality_ratio")
    rows = [[g["key"], g["label"], *(g[f] for f in fields), g["online_ratio"]] for g in groups]
    return header, rows


def _reconciliation_table(registry: Any, window_s: int, as_of_ms: int) -> Table:
    header = [
        "问题 issue",
        "企业标识 enterprise_id",
        "企业名称 enterprise_name",
        "设备 device_id",
        "设备名称 device_name",
        "地区 region",
        "最后上报 last_seen_ms",
        "序列号 serial",
    ]
    result = reconcile(registry, as_of_ms=as_of_ms, window_s=window_s, limit=_MAX_EXPORT_ROWS)
    issues = {
        "not_in_ledger": "未入台账 reporting, not in the ledger",
        "never_seen": "从未上报 in the ledger, never seen",
        "not_seen_in_window": "窗口内未上报 not seen within the window",
    }
    rows: list[list[Any]] = []
    for field, label in issues.items():
        for d in result[field]:
            rows.append(
                [
                    label,
                    d["enterprise"],
                    d["enterprise_name"],
                    d["device_id"],
                    d["name"],
                    d["region_label"],
                    d["last_seen_ms"] or "",
                    "",
                ]
            )
    for dup in result["duplicate_serials"]:
        for c in dup["claims"]:
            rows.append(
                [
                    "序列号重复 serial claimed by several enterprises",
                    c["enterprise"],
                    c["enterprise_name"],
                    c["device_id"],
                    "",
                    "",
                    "",
                    dup["serial"],
                ]
            )
    return header, rows


def _grades_table(
    registry: Any,
    rubric: Rubric,
    window_s: int,
    as_of_ms: int,
    region: str | None,
    industry: str | None,
) -> Table:
    header = [
        "企业标识 enterprise_id",
        "企业名称 enterprise_name",
        "地区 region",
        "行业 industry",
        "等级 grade",
        "联网设备 connected",
        "数据达标 quality_connected",
        "设备总量 total",
        "依据 evidence",
    ]
    result = grade_enterprises(
        registry, rubric, as_of_ms=as_of_ms, window_s=window_s, region=region, industry=industry
    )
    rows = []
    for it in result["items"]:
        evidence = "; ".join(
            f"{lv['level']} {'✓' if lv['met'] else '✗'} "
            + ", ".join(f"{e['criterion']}={_short(e['actual'])}" for e in lv["evidence"])
            for lv in it["levels"]
        )
        rows.append(
            [
                it["enterprise"],
                it["name"],
                it["region_label"],
                industry_label(it["industry"]),
                it["grade"] or "—",
                it["connected"],
                it["quality_connected"],
                it["total"],
                evidence,
            ]
        )
    return header, rows


def _telemetry_table(
    request: Request,
    registry: Any,
    key: tuple[str | None, str | None],
    now_ms: int,
    hours: float,
    notes: dict[str, str],
) -> Table:
    enterprise, device = key
    if enterprise is None or device is None:
        raise invalid("query", "device", "the telemetry report needs enterprise and device")
    if registry.get_device(enterprise, device) is None:
        raise HTTPException(404, detail=f"device {device!r} of {enterprise!r} not found")
    from_ms = now_ms - int(hours * 3600_000)
    answer = _read_telemetry(request, registry, (enterprise, device), from_ms, now_ms)
    notes["source"] = answer.source
    if answer.capped_from_ms is not None:
        notes["capped_from_ms"] = str(answer.capped_from_ms)
    points = answer.points
    names = sorted({k for p in points for k in p["values"]})
    header = ["时间 ts_ms", *names]
    return header, [[p["ts"], *(p["values"].get(k) for k in names)] for p in points]


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "/".join(str(v) for v in value) or "—"
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items()) or "0"
    return str(value)

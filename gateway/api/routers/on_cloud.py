"""Enterprises on the cloud (上云企业数) by region and industry, and their targets."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from gateway.api.deps import (
    AUTH_RESPONSES,
    READ,
    WRITE,
    WRITE_RESPONSES,
    NowMs,
    RegistryDep,
    invalid,
    parse_time,
    parse_window_param,
)
from gateway.api.models import OnCloudOut, TargetsIn, TargetsOut
from gateway.config import OnCloudConfig
from gateway.ratios import OnCloudGrouping, compute_on_cloud, on_cloud_definition, report_year
from gateway.registry.targets import TargetsError, check_targets

__all__ = ["router"]

router = APIRouter(tags=["enterprises on the cloud"])

_TARGETS_DOC = (
    "Targets of enterprises on the cloud per region (GB/T 2260: a province 130000, a city "
    "130100 or a county 130102) and optionally per year (none: every year; a target for "
    "the year wins over one for every year). PUT replaces the whole set. With the gateway "
    "config's `on_cloud.targets_file`, the file's targets replace the stored ones at "
    "every start."
)


def _config(request: Request) -> OnCloudConfig:
    config: OnCloudConfig = request.app.state.on_cloud
    return config


@router.get(
    "/api/v1/enterprises/on-cloud",
    response_model=OnCloudOut,
    responses=AUTH_RESPONSES,
    dependencies=[READ],
    description="Enterprises on the cloud overall and per group, with targets and "
    "progress.\n\n" + on_cloud_definition(),
)
def on_cloud(
    request: Request,
    registry: RegistryDep,
    now_ms: NowMs,
    group_by: OnCloudGrouping | None = None,
    window: Annotated[str, Query(max_length=16, description="e.g. 15m, 24h, 7d")] = "24h",
    region: Annotated[str | None, Query(max_length=6, description="13, 1301 or 130102")] = None,
    industry: Annotated[str | None, Query(max_length=8, description="GB/T 4754, e.g. C30")] = None,
    as_of: Annotated[str | None, Query(max_length=40, description="Unix ms or ISO 8601")] = None,
) -> dict[str, Any]:
    window_s = parse_window_param(window, "window")
    as_of_ms = parse_time(as_of, "as_of") if as_of is not None else now_ms
    try:
        report_year(as_of_ms)
    except ValueError as exc:
        raise invalid("query", "as_of", str(exc)) from None
    try:
        return compute_on_cloud(
            registry,
            group_by,
            targets=registry.target_map(),
            window_s=window_s,
            as_of_ms=as_of_ms,
            region=region,
            industry=industry,
            min_devices=_config(request).min_connected_devices,
        )
    except ValueError as exc:
        raise invalid("query", "region", str(exc)) from None


@router.get(
    "/api/v1/targets",
    response_model=TargetsOut,
    responses=AUTH_RESPONSES,
    dependencies=[READ],
    description=_TARGETS_DOC,
)
def get_targets(registry: RegistryDep) -> dict[str, Any]:
    return {"targets": registry.list_targets()}


@router.put(
    "/api/v1/targets",
    response_model=TargetsOut,
    responses=WRITE_RESPONSES,
    dependencies=[WRITE],
    description=_TARGETS_DOC,
)
def put_targets(body: TargetsIn, registry: RegistryDep) -> dict[str, Any]:
    try:
        targets = check_targets([t.model_dump() for t in body.targets], "targets")
    except TargetsError as exc:
        raise invalid("body", "targets", str(exc)) from None
    registry.replace_targets(targets)
    return {"targets": registry.list_targets()}

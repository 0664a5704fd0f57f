"""Connection ratios now and their stored history."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from gateway.api.deps import (
    AUTH_RESPONSES,
    READ,
    NowMs,
    QIdent,
    RegistryDep,
    invalid,
    parse_time,
    parse_window_param,
)
from gateway.api.models import HistoryOut, RatiosOut
from gateway.ratios import (
    DEFINITIONS,
    Grouping,
    HistoryGrouping,
    Kind,
    compute_ratios,
    history_series,
)
from gateway.registry import Registry
from gateway.registry.index import IndexView

__all__ = ["router"]

router = APIRouter(tags=["ratios"], responses=AUTH_RESPONSES, dependencies=[READ])

_MAX_HISTORY_POINTS = 10_000
_KIND_DOC = (
    "equipment: production equipment (联网设备总量 / 企业设备总量); product: products the "
    "enterprises made, in the maker's region (联网产品总量 / 生产产品总量)"
)


@router.get(
    "/api/v1/ratios",
    response_model=RatiosOut,
    description="Connection ratios overall and per group.\n\n" + DEFINITIONS,
)
async def ratios(
    request: Request,
    registry: RegistryDep,
    now_ms: NowMs,
    group_by: Grouping | None = None,
    window: Annotated[str, Query(max_length=16, description="e.g. 15m, 24h, 7d")] = "24h",
    enterprise: str | None = QIdent,
    region: Annotated[str | None, Query(max_length=6, description="13, 1301 or 130102")] = None,
    industry: Annotated[str | None, Query(max_length=8, description="GB/T 4754, e.g. C30")] = None,
    category: Annotated[str | None, Query(max_length=32)] = None,
    as_of: Annotated[str | None, Query(max_length=40, description="Unix ms or ISO 8601")] = None,
    kind: Annotated[Kind, Query(description=_KIND_DOC)] = "equipment",
) -> Response:
    window_s = parse_window_param(window, "window")
    query = _Query(group_by, window_s, enterprise, region, industry, category, kind)
    if as_of is not None:
        at = parse_time(as_of, "as_of")
        return _json(await run_in_threadpool(lambda: query.answer(registry, at, registry.view())))
    # At the current time: over the latest published view, answered once per view (and
    # ahead of time for the queries asked lately), so a dashboard repeating a query
    # costs a lookup here on the event loop; counting goes to the thread pool.
    view = registry.published_view()
    body = registry.answers.get(query, view.generation) if view is not None else None
    if isinstance(body, bytes):
        return _json(body)
    clock: Callable[[], float] = getattr(request.app.state, "clock", time.time)
    return _json(await run_in_threadpool(_answer_live, registry, query, now_ms, clock))


def _answer_live(
    registry: Registry, query: _Query, now_ms: int, clock: Callable[[], float]
) -> bytes:
    """Answer ``query`` at ``now_ms`` over a live view and keep the answer (thread pool)."""
    view = registry.view(live=True)
    body = registry.answers.get(query, view.generation)
    if isinstance(body, bytes):
        return body
    body = query.answer(registry, now_ms, view)

    def again(other: IndexView) -> bytes:
        return query.answer(registry, int(clock() * 1000), other)

    registry.answers.put(query, view.generation, body, again)
    return body


@dataclass(frozen=True, slots=True)
class _Query:
    """A ratios query but for its time."""

    group_by: str | None
    window_s: int
    enterprise: str | None
    region: str | None
    industry: str | None
    category: str | None
    kind: str

    def answer(self, registry: Registry, as_of_ms: int, view: IndexView) -> bytes:
        """The JSON answer over ``view`` at ``as_of_ms``; 422 for a malformed filter."""
        try:
            result = compute_ratios(
                registry,
                self.group_by,
                window_s=self.window_s,
                as_of_ms=as_of_ms,
                enterprise=self.enterprise,
                region=self.region,
                industry=self.industry,
                category=self.category,
                kind=self.kind,
                view=view,
            )
        except ValueError as exc:
            raise invalid("query", "region", str(exc)) from None
        # Built from plain ints/floats/strings already; re-validating 10⁴ enterprise
        # groups through the response model would cost more than computing them.
        return json.dumps(result, ensure_ascii=False, separators=(",", ":")).encode()


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")


@router.get("/api/v1/ratios/history", response_model=HistoryOut)
def history(
    registry: RegistryDep,
    now_ms: NowMs,
    group_by: HistoryGrouping = "overall",
    from_: Annotated[str | None, Query(alias="from", max_length=40)] = None,
    to: Annotated[str | None, Query(max_length=40)] = None,
    step: Annotated[str | None, Query(max_length=16, description="e.g. 1h, 1d")] = None,
    key: Annotated[str | None, Query(max_length=64)] = None,
    kind: Annotated[Kind, Query(description=_KIND_DOC)] = "equipment",
) -> dict[str, Any]:
    """The stored ratio snapshots of one grouping; ``step`` keeps the last per step."""
    to_ms = parse_time(to, "to") if to is not None else now_ms
    from_ms = parse_time(from_, "from") if from_ is not None else to_ms - 7 * 86400 * 1000
    if from_ms > to_ms:
        raise invalid("query", "from", "from must not be after to")
    step_s = parse_window_param(step, "step") if step is not None else None
    if step_s is not None and (to_ms - from_ms) // (step_s * 1000) > _MAX_HISTORY_POINTS:
        raise invalid("query", "step", f"more than {_MAX_HISTORY_POINTS} steps; use a longer step")
    rows = registry.snapshot_rows(str(group_by), from_ms, to_ms, key=key)
    return {
        "group_by": str(group_by),
        "kind": kind,
        "from_ms": from_ms,
        "to_ms": to_ms,
        "step_s": step_s,
        "series": history_series(rows, step_s=step_s, key=key, kind=kind),
    }

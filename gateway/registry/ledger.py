"""Ledger (设备台账) parsing: CSV with a header row or a JSON list, checked row by row.

A bad row never stops the import: it is reported with its line number (CSV: the file
line, header = 1; JSON: the item number, first = 1) and the reason.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.registry.codes import (
    FAMILY_CATEGORY,
    check_category,
    check_family,
    check_ident,
    check_industry,
    check_region,
    check_text,
)

__all__ = [
    "KINDS",
    "LEDGER_COLUMNS",
    "DeviceInput",
    "LedgerError",
    "RowError",
    "check_row",
    "parse_ledger",
]

LEDGER_COLUMNS = ("device_id", "enterprise", "region", "industry", "family", "category", "name")
_OPTIONAL = ("agent", "profile", "kind", "site_region", "serial")
# What a ledger row is: production equipment (the default) or a product the enterprise
# made, counted in the maker's region wherever it is installed.
KINDS = ("equipment", "product")
_MAX_ROWS = 2_000_000


class LedgerError(ValueError):
    """The ledger as a whole cannot be read (not CSV/JSON, no header, unknown column)."""


@dataclass(frozen=True, slots=True)
class DeviceInput:
    """One validated device row; region/industry None = inherit from the enterprise."""

    enterprise: str
    device_id: str
    region: str | None
    industry: str | None
    family: str
    category: str
    name: str = ""
    agent: str | None = None
    profile: str | None = None
    kind: str = "equipment"
    site_region: str | None = None
    # The maker's serial number, to find one machine claimed by two enterprises.
    serial: str | None = None


@dataclass(frozen=True, slots=True)
class RowError:
    line: int
    device_id: str | None
    reason: str


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def check_row(raw: Mapping[str, object]) -> DeviceInput:
    """Validate one row; raises ValueError naming the first bad field."""
    unknown = sorted(set(raw) - set(LEDGER_COLUMNS) - set(_OPTIONAL))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    device_id = check_ident(_strip(raw.get("device_id")), "device_id")
    enterprise = check_ident(_strip(raw.get("enterprise")), "enterprise")
    region = None if _blank(raw.get("region")) else check_region(raw.get("region"))
    industry = None if _blank(raw.get("industry")) else check_industry(raw.get("industry"))
    family = "other" if _blank(raw.get("family")) else check_family(_strip(raw.get("family")))
    if _blank(raw.get("category")):
        if family not in FAMILY_CATEGORY:
            raise ValueError(f"category is required for family {family!r}")
        category = FAMILY_CATEGORY[family]
    else:
        category = check_category(_strip(raw.get("category")))
    name = raw.get("name")
    if not _blank(name) and not isinstance(name, str):
        raise ValueError("name must be text")
    name_text = check_text(name.strip(), "name") if isinstance(name, str) else ""
    if len(name_text) > 200:
        raise ValueError("name is longer than 200 characters")
    agent = None if _blank(raw.get("agent")) else check_ident(_strip(raw.get("agent")), "agent")
    profile = (
        None if _blank(raw.get("profile")) else check_ident(_strip(raw.get("profile")), "profile")
    )
    kind, site_region = _check_kind(raw)
    serial = None if _blank(raw.get("serial")) else _check_serial(raw.get("serial"))
    return DeviceInput(
        enterprise,
        device_id,
        region,
        industry,
        family,
        category,
        name_text,
        agent,
        profile,
        kind,
        site_region,
        serial,
    )


def _check_serial(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("serial must be text")
    serial = check_text(value.strip(), "serial")
    if len(serial) > 64:
        raise ValueError("serial is longer than 64 characters")
    return serial


def _check_kind(raw: Mapping[str, object]) -> tuple[str, str | None]:
    """The row's kind (default equipment) and, for a product, where it is installed."""
    kind = "equipment" if _blank(raw.get("kind")) else _strip(raw.get("kind"))
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} must be one of {', '.join(KINDS)}")
    if _blank(raw.get("site_region")):
        return str(kind), None
    if kind != "product":
        raise ValueError("site_region is for products; equipment is counted where it is (region)")
    try:
        return str(kind), check_region(raw.get("site_region"))
    except ValueError as exc:
        raise ValueError(f"site_{exc}") from None


def _strip(value: object) -> object:
    return value.strip() if isinstance(value, str) else value


def _row_id(raw: Mapping[str, object]) -> str | None:
    value = raw.get("device_id")
    if not isinstance(value, str):
        return None
    # Echoed in the response, which must be UTF-8: a lone surrogate goes back escaped.
    return value[:64].encode("utf-8", "backslashreplace").decode("utf-8")


def parse_ledger(
    body: bytes, content_type: str
) -> tuple[list[tuple[int, DeviceInput]], list[RowError]]:
    """Parse a ledger body; returns (line, row) pairs and per-row errors.

    Raises LedgerError when the body as a whole is unusable.
    """
    kind = content_type.split(";")[0].strip().lower()
    if kind in ("application/json", "text/json"):
        return _without_repeats(*_parse_json(body))
    if kind in ("text/csv", "application/csv", "text/plain"):
        return _without_repeats(*_parse_csv(body))
    raise LedgerError(
        f"unsupported content type {kind!r}: send text/csv (with a header row) or a JSON list"
    )


def _without_repeats(
    rows: list[tuple[int, DeviceInput]], errors: list[RowError]
) -> tuple[list[tuple[int, DeviceInput]], list[RowError]]:
    """Keep the first row of each device; every repeat is rejected naming the line it repeats."""
    first: dict[tuple[str, str], int] = {}
    kept: list[tuple[int, DeviceInput]] = []
    for line, row in rows:
        key = (row.enterprise, row.device_id)
        if key in first:
            reason = f"device {row.device_id!r} of {row.enterprise!r} repeats line {first[key]}"
            errors.append(RowError(line, row.device_id, reason))
            continue
        first[key] = line
        kept.append((line, row))
    errors.sort(key=lambda e: e.line)
    return kept, errors


def _parse_json(body: bytes) -> tuple[list[tuple[int, DeviceInput]], list[RowError]]:
    try:
        data = json.loads(body.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise LedgerError(f"ledger is not valid JSON: {exc}") from exc
    except RecursionError:
        raise LedgerError("ledger JSON is nested too deeply") from None
    if not isinstance(data, list):
        raise LedgerError("a JSON ledger must be a list of device objects")
    if len(data) > _MAX_ROWS:
        raise LedgerError(f"ledger has more than {_MAX_ROWS} rows; split it")
    rows: list[tuple[int, DeviceInput]] = []
    errors: list[RowError] = []
    for line, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            errors.append(RowError(line, None, "item is not an object"))
            continue
        try:
            rows.append((line, check_row(item)))
        except ValueError as exc:
            errors.append(RowError(line, _row_id(item), str(exc)))
    return rows, errors


def _parse_csv(body: bytes) -> tuple[list[tuple[int, DeviceInput]], list[RowError]]:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LedgerError(f"ledger is not UTF-8 text: {exc}") from exc
    if "\x00" in text:
        raise LedgerError("ledger contains NUL characters; is it a binary file?")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise LedgerError("ledger is empty: expected a header row") from None
    except csv.Error as exc:
        raise LedgerError(f"ledger header is not valid CSV: {exc}") from exc
    names = [h.strip().lower() for h in header]
    for required in ("device_id", "enterprise"):
        if required not in names:
            raise LedgerError(
                f"ledger header has no {required!r} column (columns: {', '.join(LEDGER_COLUMNS)})"
            )
    for name in names:
        if name not in LEDGER_COLUMNS and name not in _OPTIONAL:
            raise LedgerError(f"ledger header: unknown column {name!r}")
    if len(set(names)) != len(names):
        raise LedgerError("ledger header repeats a column")
    rows: list[tuple[int, DeviceInput]] = []
    errors: list[RowError] = []
    line = reader.line_num
    while True:
        start = line + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            errors.append(RowError(start, None, f"not valid CSV: {exc}"))
            break
        line = reader.line_num
        if not cells or all(c.strip() == "" for c in cells):
            continue
        if len(rows) + len(errors) >= _MAX_ROWS:
            raise LedgerError(f"ledger has more than {_MAX_ROWS} rows; split it")
        if len(cells) != len(names):
            errors.append(
                RowError(start, None, f"has {len(cells)} cells, the header has {len(names)}")
            )
            continue
        raw = dict(zip(names, cells, strict=True))
        try:
            rows.append((start, check_row(raw)))
        except ValueError as exc:
            errors.append(RowError(start, _row_id(raw), str(exc)))
    return rows, errors

"""``iiot profiles probe``: which known Modbus profile fits a live device?

Each Modbus profile's points are read from the device with the project's Modbus
driver, and the profile is scored on what it would give a user:

- readable   share of points read without an error;
- in range   share of numeric points with a declared range whose value lies inside it;
- strings    share of string points that are printable text;
- SunSpec    for SunSpec profiles, the "SunS" marker at its declared register.

A profile *fits* when at least 90 % of its points read, at least 80 % of the ranged
values are in range, and (for SunSpec) the marker is there. The ranked table names the
best fit; the command exits 1 when nothing fits.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path

import typer

from device_profiles.schema import Profile, ValueType
from protocols.driver import Reading, create_driver
from protocols.errors import ProtocolError
from protocols.modbus.config import ModbusConnection

__all__ = ["ProbeResult", "probe", "probe_device", "probe_profile", "rank", "score_reading"]

_SUNSPEC_BASES = (0, 40000, 50000)
_FIT_READABLE = 0.9
_FIT_IN_RANGE = 0.8


@dataclass(slots=True)
class ProbeResult:
    profile: Profile
    readable: float = 0.0
    in_range: float | None = None
    strings: float | None = None
    sunspec: bool | None = None  # None: not a SunSpec profile
    error: str = ""

    @property
    def fits(self) -> bool:
        return (
            not self.error
            and self.readable >= _FIT_READABLE
            and (self.in_range is None or self.in_range >= _FIT_IN_RANGE)
            and self.sunspec is not False
        )

    @property
    def score(self) -> float:
        """0..1; the parts that apply to this profile, weighted."""
        if self.error:
            return 0.0
        parts = [(0.5, self.readable)]
        if self.in_range is not None:
            parts.append((0.3, self.in_range))
        if self.strings is not None:
            parts.append((0.1, self.strings))
        if self.sunspec is not None:
            parts.append((0.3, 1.0 if self.sunspec else 0.0))
        return sum(w * v for w, v in parts) / sum(w for w, _ in parts)


def _printable(text: str) -> bool:
    return all(ch.isprintable() for ch in text) and "\ufffd" not in text


def _is_sunspec(profile: Profile) -> bool:
    return "sunspec" in profile.standard.lower()


def score_reading(profile: Profile, reading: Reading) -> ProbeResult:
    """Score one profile from what its points read as."""
    res = ProbeResult(profile)
    total = len(profile.points)
    res.readable = len(reading.values) / total if total else 0.0
    ranged = [
        p
        for p in profile.points
        if p.range is not None and p.type not in (ValueType.BOOL, ValueType.STRING)
    ]
    if ranged:
        ok = 0
        for p in ranged:
            v = reading.values.get(p.name)
            assert p.range is not None
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                ok += p.range[0] <= v <= p.range[1]
        res.in_range = ok / len(ranged)
    strings = [p for p in profile.points if p.type is ValueType.STRING]
    if strings:
        good = sum(
            1
            for p in strings
            if isinstance(reading.values.get(p.name), str)
            and _printable(str(reading.values[p.name]))
        )
        res.strings = good / len(strings)
    if _is_sunspec(profile):
        marker = [p for p in strings if p.modbus is not None and p.modbus.address in _SUNSPEC_BASES]
        res.sunspec = any(reading.values.get(p.name) == "SunS" for p in marker)
    return res


async def probe_profile(
    profile: Profile, connection: ModbusConnection, *, name: str, limit: float = 5.0
) -> ProbeResult:
    """Read the device once as ``profile`` describes it and score the answer.

    ``limit`` bounds the whole read (seconds): a large map on a slow device must not
    stall a probe of many profiles.
    """
    driver = create_driver(profile, connection, name=name)
    try:
        async with asyncio.timeout(limit):
            await driver.connect()
            reading = await driver.read(profile.points)
        return score_reading(profile, reading)
    except (ProtocolError, TimeoutError) as exc:
        reason = getattr(exc, "reason", "timeout")
        return ProbeResult(profile, error=f"{reason}: {exc}".rstrip(": "))
    finally:
        await driver.aclose()


def rank(results: list[ProbeResult]) -> list[ProbeResult]:
    """Results best first: profiles that fit, then by score."""
    return sorted(results, key=lambda r: (r.fits, r.score), reverse=True)


async def probe_device(
    profiles: list[Profile],
    *,
    host: str,
    port: int,
    unit: int | None = None,
    request_timeout: float = 1.0,
) -> list[ProbeResult]:
    """Read the device once against every Modbus profile; results best first."""
    results: list[ProbeResult] = []
    for prof in profiles:
        if prof.protocol != "modbus":
            continue
        fields: dict[str, object] = {
            "host": host,
            "port": port,
            "timeout": request_timeout,
            "retries": 0,
        }
        if unit is not None:
            fields["unit"] = unit
        conn = ModbusConnection.model_validate(fields)
        limit = max(5.0, request_timeout * 10)
        results.append(await probe_profile(prof, conn, name=f"probe-{prof.id}", limit=limit))
    return rank(results)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def probe(
    host: str = typer.Option(..., "--host", help="Device address."),
    port: int = typer.Option(502, "--port", help="Modbus TCP port."),
    unit: int | None = typer.Option(None, "--unit", help="Unit id (default: each profile's)."),
    profiles_dir: list[Path] = typer.Option(
        [], "--profiles", help="Extra profile folder (repeatable)."
    ),
    timeout: float = typer.Option(1.0, "--timeout", help="Seconds per request."),
) -> None:
    """Read a live Modbus device against each known profile and name the best fit."""
    from rich.console import Console
    from rich.table import Table

    from device_profiles.loader import ProfileSetError, load_profiles

    try:
        known = list(load_profiles(profiles_dir))
    except ProfileSetError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    results = asyncio.run(
        probe_device(known, host=host, port=port, unit=unit, request_timeout=timeout)
    )
    table = Table(
        title=f"Modbus profiles against {host}:{port}" + (f" unit {unit}" if unit else "")
    )
    for col in ("rank", "profile", "family", "readable", "in range", "strings", "SunSpec",
                "score", "fits"):  # fmt: skip
        table.add_column(col)
    for i, r in enumerate(results, 1):
        sunspec = "-" if r.sunspec is None else ("yes" if r.sunspec else "no")
        table.add_row(
            str(i), r.profile.id, r.profile.family, _pct(r.readable), _pct(r.in_range),
            _pct(r.strings), sunspec, f"{r.score:.2f}", "yes" if r.fits else (r.error or "no"),
        )  # fmt: skip
    console = Console(width=160)
    console.print(table)
    best = next((r for r in results if r.fits), None)
    if best is None:
        console.print("no known profile fits this device")
        raise typer.Exit(1)
    console.print(f"best fit: {best.profile.id} ({best.profile.name})")

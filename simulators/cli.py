"""``iiot sim``: serve simulated devices (``run``) or a whole simulated site (``plant``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import typer

__all__ = ["app", "parse_fault"]

app = typer.Typer(
    help="Simulated equipment: Modbus TCP/RTU and OPC UA servers.", no_args_is_help=True
)

_SIM_ENTERPRISE = {"id": "sim", "name": "Simulated site", "region": "130000", "industry": "C"}


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def parse_fault(text: str) -> tuple[str, str, float | None, int | None]:
    """``DEVICE:MODE[:DELAY]`` → (device, mode, delay, exception code).

    DEVICE is a 0-based position or a device id; for ``exception`` the third field is
    the Modbus exception code instead of a delay.
    """
    from simulators.faults import FaultMode

    device, sep, rest = text.partition(":")
    mode, _, extra = rest.partition(":")
    if not sep or not device or not mode:
        raise ValueError(f"--fault {text!r}: expected DEVICE:MODE[:DELAY]")
    try:
        FaultMode(mode)
    except ValueError:
        modes = ", ".join(m.value for m in FaultMode)
        raise ValueError(f"--fault {text!r}: unknown mode '{mode}' (one of {modes})") from None
    delay: float | None = None
    code: int | None = None
    if extra:
        try:
            if mode == FaultMode.EXCEPTION:
                code = int(extra)
                if not 1 <= code <= 255:
                    raise ValueError
            else:
                delay = float(extra)
                if delay < 0:
                    raise ValueError
        except ValueError:
            what = "exception code 1..255" if mode == FaultMode.EXCEPTION else "delay ≥ 0"
            raise ValueError(f"--fault {text!r}: '{extra}' is not a {what}") from None
    return device, mode, delay, code


def _write_json(path: Path, doc: Any) -> None:
    # Written whole and renamed, so a reader polling for the file never sees half of it.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _print_table(plant: Any, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    names = {e.id: e.name for e in plant.config.enterprises}
    table = Table(title=title)
    for col in ("enterprise", "device", "profile", "endpoint", "fault"):
        table.add_column(col)
    for device_id, ep in plant.endpoints.items():
        mode = plant.devices[device_id].faults.mode.value
        table.add_row(
            names.get(ep.enterprise, ep.enterprise),
            device_id,
            ep.profile,
            ep.url,
            "" if mode == "none" else mode,
        )
    console = Console(width=160)
    console.print(table)
    off = [e.device for e in plant.ledger if not e.on]
    if off:
        console.print(f"not switched on (ledger only): {', '.join(off)}")
    unlisted = [d for d, ep in plant.endpoints.items() if not ep.configured]
    if unlisted:
        console.print(f"served but in no agent configuration: {', '.join(unlisted)}")
    sys.stdout.flush()


async def _serve(
    plant: Any, *, control_port: int | None, endpoints_out: Path | None, title: str
) -> None:
    from simulators.control import ControlServer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    control: ControlServer | None = None
    try:
        await plant.start()
        if control_port is not None:
            control = ControlServer(plant, host="127.0.0.1", port=control_port)
            await control.start()
        _print_table(plant, title)
        if control is not None:
            typer.echo(f"control API: {control.url}/devices")
        if endpoints_out is not None:
            doc = plant.endpoints_document()
            if control is not None:
                doc["control"] = control.url
            _write_json(endpoints_out, doc)
        typer.echo(f"serving {len(plant.endpoints)} devices; Ctrl-C to stop")
        sys.stdout.flush()
        await stop.wait()
    finally:
        if control is not None:
            await control.stop()
        await plant.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    typer.echo("stopped")


def _run(plant: Any, control_port: int | None, endpoints_out: Path | None, title: str) -> None:
    try:
        asyncio.run(
            _serve(plant, control_port=control_port, endpoints_out=endpoints_out, title=title)
        )
    except OSError as exc:
        raise _fail(str(exc), 1) from None
    except RuntimeError as exc:
        raise _fail(str(exc)) from None


def _sim_devices(
    ids: list[str], profile: str, port: int, *, framer: str, units: bool, serial: str | None
) -> list[dict[str, Any]]:
    """Plant entries of ``iiot sim run``: a port each, units on one port, or one line."""
    devices: list[dict[str, Any]] = []
    for i, ident in enumerate(ids):
        entry: dict[str, Any] = {"id": ident, "profile": profile, "framer": framer}
        if serial is not None:
            entry.update(serial=serial, unit=i + 1)
        elif units:
            entry.update(port=port, unit=i + 1)
        else:
            entry.update(port=port + i, unit=1)
        devices.append(entry)
    return devices


def _apply_faults(devices: list[dict[str, Any]], specs: list[str]) -> None:
    """Put each ``--fault`` on the plant entry it names (ValueError naming a bad one)."""
    count = len(devices)
    for spec in specs:
        who, mode, delay, code = parse_fault(spec)
        if who.isdigit():
            if int(who) >= count:
                raise ValueError(f"--fault {spec!r}: no device {who} (0..{count - 1})")
            target = devices[int(who)]
        else:
            found = [d for d in devices if d["id"] == who]
            if not found:
                raise ValueError(f"--fault {spec!r}: no device '{who}'")
            target = found[0]
        target["fault"] = {"mode": mode, "delay": delay, "code": code}


@app.command("run")
def run(
    profile: str = typer.Option(..., "--profile", "-p", help="Profile id to simulate."),
    count: int = typer.Option(1, "--count", "-n", min=1, max=10000, help="How many devices."),
    port: int = typer.Option(5020, "--port", min=1, max=65535, help="First TCP port."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    units: bool = typer.Option(
        False, "--units", help="Serve the devices as unit ids 1..N on the one port P."
    ),
    serial: str | None = typer.Option(
        None, "--serial", help="Serve the devices as RTU units 1..N on this serial line."
    ),
    baudrate: int = typer.Option(19200, "--baudrate", min=1, help="Serial line speed."),
    parity: str = typer.Option("N", "--parity", help="Serial parity: N, E or O."),
    stopbits: int = typer.Option(1, "--stopbits", min=1, max=2, help="Serial stop bits."),
    framer: str = typer.Option("tcp", "--framer", help="tcp, or rtu-over-tcp."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same values."),
    fault: list[str] = typer.Option(
        [],
        "--fault",
        help="DEVICE:MODE[:DELAY]; DEVICE is the 0-based position or the id; "
        "for exception mode the third field is the exception code. Repeatable.",
    ),
    time_scale: float = typer.Option(1.0, "--time-scale", min=0.001, help="Simulated s per s."),
    control_port: int | None = typer.Option(
        None, "--control-port", help="Serve the HTTP control API on this loopback port."
    ),
    device_id: list[str] = typer.Option(
        [], "--id", help="Device ids, one per device (default <profile>-<i>, i = 0-based position)."
    ),
    profiles_dir: list[Path] = typer.Option(
        [], "--profiles", "--profiles-dir", help="Extra profile folder (repeatable)."
    ),
    lenient: bool = typer.Option(
        False, "--lenient-addresses", help="Unmapped registers read as 0 instead of exception 02."
    ),
    endpoints_out: Path | None = typer.Option(
        None, "--endpoints-out", help="Write the served endpoints as JSON to this file."
    ),
) -> None:
    """Serve N simulated devices of one profile.

    Device i (from 0) is '<profile>-<i>' on port P+i, unit 1; with --units, all on port
    P as unit i+1; with --serial, RTU unit i+1 on that line.
    """
    from pydantic import ValidationError

    from device_profiles.loader import load_profiles
    from simulators.plant import Plant, PlantConfig, PlantError, sim_hook

    if framer not in ("tcp", "rtu-over-tcp"):
        raise _fail(f"--framer must be tcp or rtu-over-tcp, not '{framer}'")
    if (units or serial) and count > 247:
        raise _fail(f"--count {count}: at most 247 units share one port or line")
    if device_id and len(device_id) != count:
        raise _fail(f"--id given {len(device_id)} times for --count {count}")
    try:
        profiles = load_profiles(profiles_dir)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if profile not in profiles:
        known = ", ".join(sorted(p.id for p in profiles)) or "none"
        raise _fail(f"unknown profile '{profile}' (known: {known})")
    protocol = profiles[profile].protocol
    try:
        shares_port = sim_hook(protocol).shares_port
    except ValueError as exc:
        raise _fail(f"profile '{profile}': {exc}") from None
    if not shares_port and (units or serial or framer != "tcp"):
        raise _fail(
            f"profile '{profile}' speaks {protocol}, whose devices do not share a port: "
            "--units, --serial and --framer apply to Modbus only"
        )
    ids = device_id or [f"{profile}-{i}" for i in range(count)]
    devices = _sim_devices(ids, profile, port, framer=framer, units=units, serial=serial)
    try:
        _apply_faults(devices, fault)
        if port + (0 if units or serial else count - 1) > 65535:
            raise ValueError(f"--port {port} + --count {count} runs past port 65535")
        config = PlantConfig.model_validate(
            {
                "host": host,
                "base_port": port,
                "seed": seed,
                "time_scale": time_scale,
                "strict_addresses": not lenient,
                "serial_line": {"baudrate": baudrate, "parity": parity, "stopbits": stopbits},
                "enterprises": [{**_SIM_ENTERPRISE, "devices": devices}],
            }
        )
        plant = Plant(config, profiles=profiles, source="iiot sim run")
    except (ValueError, ValidationError, PlantError) as exc:
        raise _fail(str(exc)) from None
    _run(plant, control_port, endpoints_out, f"iiot sim run: {profile} x {count}")


@app.command("plant")
def plant_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="Plant file (YAML)."),
    endpoints_out: Path | None = typer.Option(
        None, "--endpoints-out", help="Write the served endpoints and the ledger as JSON."
    ),
    control_port: int | None = typer.Option(
        None, "--control-port", help="Serve the HTTP control API on this loopback port."
    ),
    base_port: int | None = typer.Option(
        None, "--base-port", min=1, max=65535, help="Override the file's base_port."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Override the file's seed."),
) -> None:
    """Serve a whole simulated site described by a plant file."""
    from simulators.plant import Plant, PlantError, load_plant_config

    try:
        cfg = load_plant_config(config)
        overrides: dict[str, Any] = {}
        if base_port is not None:
            overrides["base_port"] = base_port
        if seed is not None:
            overrides["seed"] = seed
        if overrides:
            cfg = cfg.model_copy(update=overrides)
        plant = Plant(cfg, source=str(config))
    except PlantError as exc:
        raise _fail(str(exc)) from None
    _run(plant, control_port, endpoints_out, f"iiot sim plant: {config}")

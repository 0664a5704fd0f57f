"""``iiot agent config push|show``: an agent's remote configuration, through the gateway's API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

__all__ = ["app"]

app = typer.Typer(
    help="An agent's remote configuration, kept by the gateway.", no_args_is_help=True
)

_API = typer.Option(..., "--api", envvar="IIOT_API", help="The gateway's base URL.")
_TOKEN = typer.Option(
    ..., "--token", envvar="IIOT_API_TOKEN", help="An admin token (a read token for show)."
)
_ENTERPRISE = typer.Option(None, "--enterprise", help="Default: the file's 'enterprise'.")
_AGENT = typer.Option(None, "--agent", help="Default: the file's 'agent_id'.")


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def _read_yaml(path: Path) -> Any:
    from iiot_common.yamlfile import YamlFileError, read_yaml

    try:
        return read_yaml(path)
    except YamlFileError as exc:
        raise _fail(str(exc), 2) from None


def _profile_docs(entries: list[Any], base: Path) -> list[dict[str, Any]]:
    """Profiles to upload: inline mappings, or profile files and folders (as agent.yaml)."""
    docs: list[dict[str, Any]] = []
    for entry in entries:
        if isinstance(entry, dict):
            docs.append(entry)
            continue
        path = Path(entry) if Path(entry).is_absolute() else base / str(entry)
        files = sorted(path.rglob("*.yaml")) if path.is_dir() else [path]
        for f in files:
            data = _read_yaml(f)
            if not isinstance(data, dict):
                raise _fail(f"{f}: a profile must be a mapping", 2)
            docs.append(data)
    return docs


def _request(method: str, url: str, token: str, body: Any = None) -> dict[str, Any]:
    import httpx

    try:
        r = httpx.request(
            method, url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach the gateway at {url}: {exc}") from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        if isinstance(detail, list):
            detail = "\n".join(f"  - {d.get('msg', d)}" for d in detail)
        raise _fail(f"refused ({r.status_code}):\n{detail}")
    out: dict[str, Any] = r.json()
    return out


def _names(data: dict[str, Any], enterprise: str | None, agent: str | None) -> tuple[str, str]:
    enterprise = enterprise or data.get("enterprise")
    agent = agent or data.get("agent_id")
    if not isinstance(enterprise, str) or not isinstance(agent, str):
        raise _fail("give --enterprise and --agent (or a file with enterprise and agent_id)", 2)
    return enterprise, agent


@app.command("push")
def push(
    file: Path = typer.Argument(..., help="YAML with devices (agent.yaml's), profiles, discovery."),
    api: str = _API,
    token: str = _TOKEN,
    enterprise: str | None = _ENTERPRISE,
    agent: str | None = _AGENT,
) -> None:
    """Send a desired configuration; the gateway checks it, stores a new version, publishes it."""
    data = _read_yaml(file)
    if not isinstance(data, dict):
        raise _fail(f"{file}: expected a mapping with 'devices'", 2)
    ent, ag = _names(data, enterprise, agent)
    docs = _profile_docs(data.get("profiles") or [], file.resolve().parent)
    # A folder's families.yaml ({families: [...]}) travels beside its profiles.
    families = [
        f
        for d in docs
        if set(d) == {"families"} and isinstance(d["families"], list)
        for f in d["families"]
    ]
    body: dict[str, Any] = {
        "devices": data.get("devices") or [],
        "profiles": [d for d in docs if set(d) != {"families"}],
        "families": families,
    }
    if data.get("discovery") is not None:
        body["discovery"] = data["discovery"]
    out = _request("PUT", f"{api.rstrip('/')}/api/v1/agents/{ent}/{ag}/config", token, body)
    desired = out["desired"]
    note = "" if desired["published"] else " (stored; not yet on the broker)"
    typer.echo(
        f"agent '{ag}' of '{ent}': version {desired['version']} with "
        f"{len(desired['config']['devices'])} device(s){note}"
    )


@app.command("show")
def show(
    api: str = _API,
    token: str = _TOKEN,
    enterprise: str = typer.Option(..., "--enterprise"),
    agent: str = typer.Option(..., "--agent"),
    as_json: bool = typer.Option(False, "--json", help="Print the whole answer as JSON."),
) -> None:
    """Show the desired configuration and what the agent reported; exit 3 when not in sync."""
    out = _request("GET", f"{api.rstrip('/')}/api/v1/agents/{enterprise}/{agent}/config", token)
    if as_json:
        typer.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    desired, reported = out["desired"], out["reported"]
    if desired is None:
        typer.echo(f"agent '{agent}': no desired configuration (it runs its local file)")
    else:
        ids = ", ".join(d.get("id", "?") for d in desired["config"]["devices"]) or "none"
        typer.echo(f"desired  version {desired['version']}: devices {ids}")
    if reported is None:
        typer.echo("reported nothing yet")
        raise typer.Exit(0 if desired is None else 3)
    state = "applied" if reported["applied"] else "refused"
    typer.echo(
        f"reported version {reported['version']} {state}; running version "
        f"{reported['running_version']}"
    )
    for where, why in sorted(reported["errors"].items()):
        typer.echo(f"  - {where}: {why}")
    if not out["in_sync"]:
        raise typer.Exit(3)

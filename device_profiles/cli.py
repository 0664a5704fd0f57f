"""``iiot profiles``: list, validate, schema (probe comes with the agent)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from device_profiles.families import FAMILIES_FILE

__all__ = ["app"]

app = typer.Typer(
    help="Device profiles: list, validate, print the JSON Schema.", no_args_is_help=True
)

_SUFFIXES = (".yaml", ".yml")


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(
            p
            for p in path.rglob("*")
            if p.suffix in _SUFFIXES and p.is_file() and p.name != FAMILIES_FILE
        )
    return [path]


@app.command("list")
def list_profiles(
    profiles: list[Path] = typer.Option(
        [],
        "--profiles",
        "-p",
        help="Extra folder (or file) of profiles, added to the shipped ones. Repeatable.",
    ),
) -> None:
    """Show every known profile: id, family, category, protocol, points."""
    from rich.console import Console
    from rich.table import Table

    from device_profiles.loader import ProfileSetError, load_profiles
    from device_profiles.schema import CATEGORY_LABELS_ZH

    try:
        found = load_profiles(profiles)
    except ProfileSetError as exc:
        for err in exc.errors:
            typer.echo(str(err), err=True)
        raise typer.Exit(1) from None
    console = Console()
    if not console.is_terminal:
        # Piped output: do not squeeze ids into a narrow default width.
        console = Console(width=max(console.width, 200))
    table = Table(title=f"{len(found)} device profiles")
    for col in ("id", "name_zh", "family", "category", "protocol", "points"):
        table.add_column(
            col, no_wrap=col != "name_zh", justify="right" if col == "points" else "left"
        )
    for p in found:
        table.add_row(
            p.id,
            p.name_zh,
            f"{p.family} ({found.families[p.family].name_zh})",
            f"{p.category.value} ({CATEGORY_LABELS_ZH[p.category]})",
            p.protocol,
            str(len(p.points)),
        )
    console.print(table)


@app.command("validate")
def validate(
    paths: list[Path] = typer.Argument(..., help="Profile files or folders (searched for *.yaml)."),
) -> None:
    """Check profile files; print 'ok' per good file and every problem of bad ones."""
    from device_profiles.families import family_files, load_families
    from device_profiles.loader import ProfileError, load_profile

    bad = 0
    good = 0
    ids: dict[str, Path] = {}
    # Families an integrator adds in a families.yaml of a checked folder count for all.
    families, problems = load_families(f for root in paths for f in family_files(root))
    for problem in problems:
        typer.echo(problem, err=True)
        bad += 1
    for root in paths:
        if not root.exists():
            typer.echo(f"{root}: no such file or folder", err=True)
            bad += 1
            continue
        files = _files(root)
        if not files:
            typer.echo(f"{root}: no profile files (*.yaml) found", err=True)
            bad += 1
            continue
        for f in files:
            try:
                prof = load_profile(f, families=families)
            except ProfileError as exc:
                typer.echo(str(exc), err=True)
                bad += 1
                continue
            if prof.id in ids and ids[prof.id].resolve() != f.resolve():
                typer.echo(
                    f"{f}: profile id '{prof.id}' is already defined in {ids[prof.id]}", err=True
                )
                bad += 1
                continue
            ids[prof.id] = f
            good += 1
            typer.echo(f"ok {f} ({prof.id}, {len(prof.points)} points)")
    typer.echo(f"{good} ok, {bad} bad", err=bad > 0)
    if bad:
        raise typer.Exit(1)


@app.command("schema")
def schema() -> None:
    """Print the JSON Schema of a profile (for editors and other tools)."""
    from device_profiles.schema import profile_json_schema

    doc = profile_json_schema()
    doc.setdefault("$schema", "https://json-schema.org/draft/2020-12/schema")
    doc.setdefault("title", "iiot device profile")
    typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))

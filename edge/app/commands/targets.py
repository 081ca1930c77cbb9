"""`edge targets`: list the device catalog or show one target with the source of every figure."""

from __future__ import annotations

import json
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

import targets as catalog_mod
from edge.errors import EdgeError
from targets import Target, format_rate, format_size

app = typer.Typer(
    help="Device targets: memory tiers, dtypes and runtimes, each figure with its source.",
    no_args_is_help=True,
)

JSON_HELP = "Print one JSON object instead of a table."


def _fail(error: EdgeError) -> NoReturn:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


def _print_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def _sizes(target: Target, kind: str) -> str:
    tiers = target.tier(kind)
    if not tiers:
        return "-"
    total = format_size(target.total_bytes(kind))
    return total if len(tiers) == 1 else f"{total} ({len(tiers)} regions)"


def _bandwidth(value: float | None) -> str:
    return "-" if value is None else format_rate(value, "B/s")


@app.command("list")
def list_targets(json_out: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List the catalog: SRAM, flash/DRAM, dtypes and runtime of every target."""
    try:
        targets = catalog_mod.catalog()
    except EdgeError as e:
        _fail(e)
    if json_out:
        _print_json({"targets": [t.to_dict() for t in targets]})
        return
    table = Table(title="edge targets (details and sources: edge targets show NAME)")
    for column in ("name", "SRAM", "flash / DRAM", "dtypes"):
        table.add_column(column, overflow="fold")
    table.add_column("runtime", overflow="fold", ratio=1)
    for t in targets:
        off_chip = " / ".join(_sizes(t, kind) for kind in ("flash", "dram"))
        runtime = (t.runtime or "-").split(";")[0]  # the first clause; `show` has the rest
        table.add_row(t.name, _sizes(t, "sram"), off_chip, " ".join(t.dtypes), Text(runtime))
    Console().print(table)


@app.command()
def show(
    name_or_file: str = typer.Argument(
        ..., metavar="NAME_OR_FILE", help="A catalog name or a path to a .toml file."
    ),
    json_out: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Show every field of one target, with the source of each figure."""
    try:
        target = catalog_mod.load(name_or_file)
    except EdgeError as e:
        _fail(e)
    if json_out:
        _print_json(target.to_dict())
        return
    console = Console()
    console.print(
        f"[bold]{escape(target.name)}[/bold]: {escape(target.description)}", highlight=False
    )
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="bold")
    fields.add_column(overflow="fold")
    fields.add_row("file", Text(target.origin))
    fields.add_row("dtypes", " ".join(target.dtypes))
    for label, value in (
        ("runtime", target.runtime),
        ("cpu", target.cpu),
        ("triple", target.triple),
    ):
        if value:
            fields.add_row(label, Text(value))
    if target.compute_ops_per_s is not None:
        dtype = f" ({target.compute_dtype})" if target.compute_dtype else ""
        fields.add_row("compute", f"{format_rate(target.compute_ops_per_s, 'ops/s')}{dtype}")
        fields.add_row("  source", Text(target.compute_source))
    fields.add_row("source", Text(target.source))
    if target.notes:
        fields.add_row("notes", Text(target.notes))
    console.print(fields, highlight=False)
    tiers = Table(title="memory tiers")
    for column in ("name", "kind", "size", "bandwidth", "source"):
        tiers.add_column(column, overflow="fold")
    for t in target.tiers:
        source = escape(t.source) + (f"\n[dim]{escape(t.notes)}[/dim]" if t.notes else "")
        tiers.add_row(
            Text(t.name), t.kind, format_size(t.bytes), _bandwidth(t.bandwidth_bytes_per_s), source
        )
    console.print(tiers, highlight=False)

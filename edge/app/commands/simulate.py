"""`edge simulate`: does an ONNX graph fit a device, where does every tensor live.

The command is thin: `run_simulation` does the work and takes a ModelProto (or a path) and a
manifest dict, so callers that build graphs in memory (an exporter, a bundle) skip the files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from onnx import ModelProto
from rich.console import Console

from edge.errors import EdgeError
from edge.sim.onnx_graph import GraphOptions
from edge.sim.report import plot_timeline, render_code_size, render_table
from edge.sim.simulate import (
    POLICIES,
    MemoryReport,
    SimOptions,
    load_target,
    max_batch_that_fits,
    simulate,
    simulate_sequence,
)
from targets import Target


def read_iree_report(bundle: Path) -> dict[str, Any] | None:
    from export.iree import read_report

    return read_report(bundle)


def parse_dims(items: list[str]) -> dict[str, int]:
    """['batch=32', 'seq=128'] -> {'batch': 32, 'seq': 128}."""
    dims: dict[str, int] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value.strip().isdigit() or int(value) < 1:
            raise EdgeError(f"--dim expects name=N with N >= 1, got {item!r}")
        dims[key.strip()] = int(value)
    return dims


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeError(f"manifest not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeError(f"cannot read manifest {path}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise EdgeError(f"manifest {path} must be a JSON object")
    return data


def sim_options(
    *,
    manifest: Mapping[str, Any] | None = None,
    batch: int | None = None,
    dims: Mapping[str, int] | None = None,
    persistent: str = "auto",
    inplace: bool = True,
) -> SimOptions:
    graph = GraphOptions.from_manifest(manifest, dims=dict(dims or {}), batch_size=batch)
    return SimOptions(persistent=persistent, inplace=inplace, graph=graph)


def run_simulation(
    model: ModelProto | str | Path | bytes,
    target: Target | str | Path,
    *,
    manifest: Mapping[str, Any] | None = None,
    batch: int | None = None,
    dims: Mapping[str, int] | None = None,
    persistent: str = "auto",
    inplace: bool = True,
) -> MemoryReport:
    """Simulate `model` on `target`; `manifest` = {bindings, param_names, state_names}."""
    options = sim_options(
        manifest=manifest, batch=batch, dims=dims, persistent=persistent, inplace=inplace
    )
    return simulate(model, load_target(target), options)


def per_layer_report(
    layers: list[tuple[ModelProto, dict[str, Any]]], target: Target, *, batch: int | None,
    persistent: str, inplace: bool,
) -> MemoryReport:
    """The per-layer graphs run one after another (the what-if beside the whole step)."""
    from edge.sim.onnx_graph import schedule_from_onnx

    schedules = [schedule_from_onnx(m, sim_options(manifest=view, batch=batch).graph)
                 for m, view in layers]
    return simulate_sequence(schedules, target, SimOptions(persistent=persistent,
                                                           inplace=inplace))


def simulate_cmd(
    target: Annotated[str, typer.Option("--target", help="Catalog name or a target .toml file.")],
    model: Annotated[
        Path | None, typer.Option("--model", help="ONNX graph (.onnx) to simulate.")
    ] = None,
    bundle: Annotated[
        Path | None, typer.Option("--bundle", help="A bundle `edge export` wrote.")
    ] = None,
    rule: Annotated[
        str | None,
        typer.Option(
            "--rule",
            help="Export this rule's step and simulate it, "
            "beside backprop (BP-InfoNCE) on the same network.",
        ),
    ] = None,
    data: Annotated[str, typer.Option("--data", help="Input shape for --rule.")] = "cifar10",
    net: Annotated[str | None, typer.Option("--net", help="Network preset for --rule.")] = None,
    width: Annotated[float, typer.Option("--width", help="Width multiplier for --rule.")] = 1.0,
    batch: Annotated[
        int | None, typer.Option("--batch", help="Batch size for a dynamic batch dim.")
    ] = None,
    dim: Annotated[list[str], typer.Option("--dim", help="Dynamic dim name=N (repeatable).")] = [],  # noqa: B006
    manifest: Annotated[
        Path | None,
        typer.Option(
            "--manifest", help="JSON: {bindings: {new: param}, param_names, state_names}."
        ),
    ] = None,
    persistent: Annotated[
        str,
        typer.Option(
            "--persistent", help=f"Where parameters/optimizer state live: {' | '.join(POLICIES)}."
        ),
    ] = "auto",
    inplace: Annotated[
        bool,
        typer.Option(
            "--inplace/--no-inplace", help="Let new parameters overwrite the old in place."
        ),
    ] = True,
    max_batch: Annotated[
        bool, typer.Option("--max-batch", help="Also search the largest batch that fits.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG timeline.")] = None,
) -> None:
    """Simulate a graph on a device: fits?, peak, arena plan, and where every tensor lives."""
    from edge.app.commands import sim_sources

    bp_report = None
    try:
        if sum(x is not None for x in (model, bundle, rule)) != 1:
            raise EdgeError("give exactly one of --model FILE.onnx, --bundle DIR, --rule NAME")
        tgt = load_target(target)
        man = read_manifest(manifest) if manifest else None
        if bundle is not None:
            model, man = sim_sources.from_bundle(bundle)
        elif rule is not None:
            if batch is not None and batch < 2:
                raise EdgeError(
                    "--batch must be at least 2 for a rule (negatives come from the batch)"
                )
            batch = batch or 32
            model, man = sim_sources.from_rule(rule, data, net, width, batch)
        options = sim_options(
            manifest=man, batch=batch, dims=parse_dims(dim), persistent=persistent, inplace=inplace
        )
        report = simulate(model, tgt, options)
        layers = (sim_sources.layers_from_bundle(bundle) if bundle is not None
                  else sim_sources.layers_from_rule(rule, data, net, width, batch)
                  if rule is not None else [])
        layer_report = (per_layer_report(layers, tgt, batch=batch, persistent=persistent,
                                         inplace=inplace) if layers else None)
        if rule is not None:
            bp = sim_sources.backprop_schedule(data, net, width, batch)
            bp_report = simulate(bp, tgt, SimOptions(persistent=persistent, inplace=inplace))
        best = max_batch_that_fits(model, tgt, options) if max_batch else None
        if plot is not None:
            plot_timeline(report, plot)
    except EdgeError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        obj = report.to_dict()
        if bp_report is not None:
            obj["rule"] = rule
            obj["backprop_peak_bytes"] = bp_report.peak_bytes
            obj["backprop_fits"] = bp_report.fits
            obj["local_vs_backprop_peak"] = report.peak_bytes / bp_report.peak_bytes
        if layer_report is not None:
            obj["per_layer"] = {
                "graphs": len(layers), "fits": layer_report.fits,
                "peak_bytes": layer_report.peak_bytes, "arena_bytes": layer_report.arena_bytes,
                "lower_bound_bytes": layer_report.lower_bound_bytes,
                "persistent_onchip_bytes": layer_report.persistent_onchip_bytes,
                "peak_op": dict(layer_report.peak_op),
                "tiers": [asdict(t) for t in layer_report.tiers],
            }
            obj["per_layer_vs_whole_peak"] = layer_report.peak_bytes / report.peak_bytes
        if max_batch:
            obj["max_batch"] = best
        if plot is not None:
            obj["plot"] = str(plot)
        if bundle is not None and (iree := read_iree_report(bundle)):
            obj["code_size"] = iree.get("cross")  # edge export --compile iree's artifacts
        typer.echo(json.dumps(obj, default=str))
        return
    console = Console()
    render_table(report, console)
    if bundle is not None and (iree := read_iree_report(bundle)):
        render_code_size(iree, console)
    if layer_report is not None:
        console.print(
            f"per-layer graphs ({len(layers)}, one after another): peak "
            f"{layer_report.peak_bytes:,} B, fits: {'yes' if layer_report.fits else 'no'}; "
            f"per-layer / whole step peak {layer_report.peak_bytes / report.peak_bytes:.2f}"
        )
    if bp_report is not None:
        console.print(
            f"backprop (bp-infonce, same network): peak {bp_report.peak_bytes:,} B, "
            f"fits: {'yes' if bp_report.fits else 'no'}; local / backprop peak "
            f"{report.peak_bytes / bp_report.peak_bytes:.2f}"
        )
    if max_batch:
        shown = best if best is not None else "none (batch 1 does not fit)"
        console.print(f"largest batch that fits: {shown}")
    if plot is not None:
        console.print(f"timeline written to {plot}")

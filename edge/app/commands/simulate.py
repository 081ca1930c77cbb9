"""`edge simulate`: does an ONNX graph fit a device, where does every tensor live.

The command is thin: `run_simulation` does the work and takes a ModelProto (or a path) and a
manifest dict, so callers that build graphs in memory (an exporter, a bundle) skip the files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edge.errors import EdgeError

if TYPE_CHECKING:  # the simulator imports onnx: only when a command runs, so bad flags are quick
    from onnx import ModelProto

    from edge.sim.simulate import MemoryReport, SimOptions
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
    from edge.sim.onnx_graph import GraphOptions
    from edge.sim.simulate import SimOptions

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
    from edge.sim.simulate import load_target, simulate

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
    from edge.sim.simulate import SimOptions, simulate_sequence

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
    rule: Annotated[str | None, typer.Option(
        "--rule", help="Export this rule's step (as `edge export` would) and simulate it, "
        "beside backprop (BP-InfoNCE) on the same network.")] = None,
    data: Annotated[str, typer.Option("--data", help="Input shape for --rule.")] = "cifar10",
    net: Annotated[str | None, typer.Option("--net", help="Preset or .toml spec for --rule.")]
    = None,
    width: Annotated[float, typer.Option("--width", help="Width multiplier for --rule.")] = 1.0,
    quant: Annotated[str, typer.Option(help="--rule: fp32 | int8 | int8-w16.")] = "fp32",
    mode: Annotated[str, typer.Option(help="--rule with --quant int8*: integer.")] = "integer",
    optimizer: Annotated[str, typer.Option(help="--rule: adamw | sgd.")] = "adamw",
    hp: Annotated[list[str], typer.Option(help="--rule: hyper-parameter key=value.")] = [],  # noqa: B006
    negatives: Annotated[str, typer.Option(
        help="--rule: batch | memory:K (as edge train).")] = "batch",
    per_layer: Annotated[bool, typer.Option(
        "--per-layer", help="--rule: also the per-block graphs run one after another.")] = False,
    profile: Annotated[str, typer.Option(help="--rule: operator profile plain | npu.")]
    = "plain",
    batch: Annotated[
        int | None, typer.Option("--batch", help="Batch size (for --rule; or a dynamic batch).")
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
            "--persistent", help="Where parameters and state live: auto | sram | flash | dram."
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
    from edge.app.config import TrainConfig

    if sum(x is not None for x in (model, bundle, rule)) != 1:
        raise EdgeError("give exactly one of --model FILE.onnx, --bundle DIR, --rule NAME")
    cfg = None
    if rule is not None:
        from edge.app.commands import parse_hparams

        cfg = TrainConfig(rule=rule, data=data, net=net, width=width, quant=quant, mode=mode,
                          optimizer=optimizer, rule_hparams=parse_hparams(hp),
                          negatives=negatives)
        batch = batch or 32
    elif quant != "fp32" or per_layer or hp or negatives != "batch":
        raise EdgeError("--quant, --mode, --hp, --negatives and --per-layer describe a --rule's "
                        "step; a bundle or model says its own")
    from rich.console import Console

    from edge.app.commands import sim_sources
    from edge.sim.report import plot_timeline, render_code_size, render_table
    from edge.sim.simulate import SimOptions, load_target, simulate

    tgt = load_target(target)
    man = read_manifest(manifest) if manifest else None
    if bundle is not None:
        model, man = sim_sources.from_bundle(bundle)
    elif cfg is not None:
        model, man = sim_sources.from_rule(cfg, batch, profile)
    # graphs built here or in a bundle have static shapes: --batch sizes only a --model's
    # dynamic batch dimension
    dyn_batch = batch if cfg is None else None
    options = sim_options(
        manifest=man, batch=dyn_batch, dims=parse_dims(dim), persistent=persistent,
        inplace=inplace
    )
    report = simulate(model, tgt, options)
    layers = []
    if bundle is not None:
        layers = sim_sources.layers_from_bundle(bundle)
    elif cfg is not None and per_layer:
        layers = sim_sources.layers_from_rule(cfg, batch, profile)
    layer_report = (per_layer_report(layers, tgt, batch=dyn_batch, persistent=persistent,
                                     inplace=inplace) if layers else None)
    float_report = bp_report = None
    if cfg is not None:
        sim = SimOptions(persistent=persistent, inplace=inplace)
        bp_report = simulate(sim_sources.backprop_schedule(cfg, batch), tgt, sim)
        if cfg.quant != "fp32":
            from dataclasses import replace

            fm, fman = sim_sources.from_rule(replace(cfg, quant="fp32"), batch, profile)
            float_report = simulate(fm, tgt, sim_options(manifest=fman, persistent=persistent,
                                                         inplace=inplace))
    best = None
    if max_batch:
        best = (rule_max_batch(cfg, tgt, persistent, inplace, profile) if cfg is not None
                else bundle_max_batch(model, tgt, options, bundle is not None))
    if plot is not None:
        plot_timeline(report, plot)
    if as_json:
        obj = report.to_dict()
        if cfg is not None:
            obj["rule"], obj["quant"], obj["batch"] = rule, quant, batch
            obj["backprop_peak_bytes"] = bp_report.peak_bytes
            obj["backprop_fits"] = bp_report.fits
            obj["local_vs_backprop_peak"] = report.peak_bytes / bp_report.peak_bytes
        if float_report is not None:
            obj["fp32_step"] = {"peak_bytes": float_report.peak_bytes, "fits": float_report.fits,
                                "total_bytes": total_bytes(float_report)}
            obj["total_bytes"] = total_bytes(report)
            obj["integer_vs_fp32_total"] = total_bytes(report) / total_bytes(float_report)
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
            if best is None:
                obj["max_batch_note"] = NO_BATCH_FITS
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
    if float_report is not None:
        console.print(f"fp32 step of the same rule: {total_bytes(float_report):,} B in all "
                      f"(arena + parameters + state), fits: "
                      f"{'yes' if float_report.fits else 'no'}; integer / fp32 "
                      f"{total_bytes(report) / total_bytes(float_report):.2f}")
    if bp_report is not None:
        console.print(
            f"backprop (bp-infonce, same network): peak {bp_report.peak_bytes:,} B, "
            f"fits: {'yes' if bp_report.fits else 'no'}; local / backprop peak "
            f"{report.peak_bytes / bp_report.peak_bytes:.2f}"
        )
    if max_batch:
        shown = best if best is not None else f"none ({NO_BATCH_FITS})"
        console.print(f"largest batch that fits: {shown}")
    if plot is not None:
        console.print(f"timeline written to {plot}")


MAX_BATCH = 4096
NO_BATCH_FITS = ("the smallest batch does not fit; see the peak above: try a narrower --width, "
                 "--quant int8-w16 --mode integer, or a larger target")


def total_bytes(report: Any) -> int:
    """Everything a step holds, wherever it lives: the arena, parameters and state (the
    on-chip peak depends on where the placement policy put the persistent tensors)."""
    d = report.to_dict()["per_category"]
    return report.arena_bytes + d.get("parameter", 0) + d.get("optimizer_state", 0)


def rule_max_batch(cfg: Any, tgt: Target, persistent: str, inplace: bool,
                   profile: str) -> int | None:
    """The largest batch whose exported step fits `tgt` (re-exported per batch: doubling,
    then bisection; the step's peak grows with the batch), from 1 with a memory of
    negatives, else 2 (in-batch negatives need two images)."""
    from edge.app.commands import sim_sources
    from edge.sim.simulate import simulate

    def fits(b: int) -> bool:
        m, man = sim_sources.from_rule(cfg, b, profile)
        return simulate(m, tgt, sim_options(manifest=man, persistent=persistent,
                                            inplace=inplace)).fits

    lowest = 1 if cfg.memory_size() else 2
    if not fits(lowest):
        return None
    lo, hi = lowest, lowest * 2
    while hi <= MAX_BATCH and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, MAX_BATCH + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def bundle_max_batch(model: Any, tgt: Target, options: SimOptions, is_bundle: bool) -> int | None:
    """The largest batch of a graph with a dynamic batch dimension; a fixed-batch graph says
    so in one line."""
    from edge.sim.onnx_graph import load_model
    from edge.sim.simulate import max_batch_that_fits

    m = load_model(model)
    dynamic = any(not d.HasField("dim_value") for i in m.graph.input
                  for d in i.type.tensor_type.shape.dim[:1])
    if not dynamic:
        what = "this bundle's step" if is_bundle else "this graph"
        raise EdgeError(f"--max-batch: {what} has a fixed batch size (exported at one batch); "
                        "use --rule to re-export per batch, or export with a dynamic batch")
    return max_batch_that_fits(model, tgt, options)

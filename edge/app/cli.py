"""The `edge` command: thin: parse, call the library, print a table or one JSON object.

Every user-facing failure is an `EdgeError`; `main` turns it into `error: <one line>` on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from edge import __version__
from edge.app.commands import parse_hparams
from edge.errors import EdgeError

app = typer.Typer(
    help="On-device learning with layer-local self-supervised rules.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out_console = Console()


def _version(value: bool) -> None:
    if value:
        print(f"edge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    pass


def _emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, indent=2, default=str))


@app.command()
def train(
    rule: Annotated[
        str, typer.Option(help="Learning rule (edge rules lists them).")
    ] = "clapp++",
    data: Annotated[str, typer.Option(
        help="digits | mnist | cifar10, or a path to your data (.npz, an image folder, "
        "STL-10 or Tiny ImageNet).")] = "digits",
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 10,
    subset: Annotated[int | None, typer.Option(help="Use the first N training images.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: the rule's).")] = None,
    optimizer: Annotated[str, typer.Option(help="adamw | sgd.")] = "adamw",
    weight_decay: Annotated[float, typer.Option(help="Decoupled (AdamW) or L2 (SGD).")] = 0.0,
    net: Annotated[str | None, typer.Option(
        help="Preset (edge nets lists them) or a .toml network spec.")] = None,
    width: Annotated[float, typer.Option(help="Channel width multiplier of a preset.")] = 1.0,
    hp: Annotated[
        list[str], typer.Option(help="Rule hyper-parameter key=value (repeatable).")
    ] = [],  # noqa: B006
    views: Annotated[str | None, typer.Option(
        help="View augmentation preset (default: the data set's).")] = None,
    head_labels: Annotated[int, typer.Option(
        help="Train an on-device head (nearest class means) from the first K labelled "
        "images of each class.")] = 0,
    negatives: Annotated[str, typer.Option(
        help="batch (image i+1 of the batch) | memory:K (the last K codes; works at batch 1).")]
    = "batch",
    probe_layers: Annotated[str, typer.Option(help="Probe features: all | last.")] = "all",
    seed: Annotated[int, typer.Option(help="Seed for weights, shuffling and views.")] = 0,
    device: Annotated[str, typer.Option(help="torch device for the step: cpu | cuda.")] = "cpu",
    runtime: Annotated[
        str, typer.Option(help="What runs each step: torch | onnxruntime | openvino | qnn-htp "
                          "| iree.")
    ] = "torch",
    profile: Annotated[
        str | None, typer.Option(help="Operator profile of the exported step: plain | npu "
                                 "(default: npu for qnn-htp and iree, else plain).")
    ] = None,
    per_layer: Annotated[bool, typer.Option(
        help="With --runtime: run the per-block graphs in a chain.")] = False,
    data_dir: Annotated[str | None, typer.Option(help="Data root (else $EDGE_DATA).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run directory (default runs/RULE-DATA).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT's checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in OUT.")] = False,
    alignment: Annotated[
        bool, typer.Option(help="Per-block cosine of the update with the BP-InfoNCE gradient.")
    ] = False,
    alignment_every: Annotated[
        int, typer.Option(help="Measure alignment on every k-th batch (each costs a BP pass).")
    ] = 1,
    quant: Annotated[str, typer.Option(help="Weights: fp32 | int8 | int8-w16.")] = "fp32",
    mode: Annotated[
        str, typer.Option(help="With --quant int8*: qat (fp32 latent) | integer.")
    ] = "integer",
    nproc: Annotated[int, typer.Option(
        help="Train on N local processes (torch.distributed, gloo); under torchrun the "
        "group torchrun starts.")] = 1,
    parallel: Annotated[str, typer.Option(
        help="With --nproc / torchrun: data (shards of the batch) | pipeline (contiguous "
        "groups of blocks per process).")] = "data",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Train an encoder with a learning rule, then linear-probe it."""
    from edge.app.config import TrainConfig

    if nproc != 1 or parallel != "data" or "WORLD_SIZE" in os.environ:
        from edge.app import distributed

        if parallel not in distributed.MODES:
            raise EdgeError(f"unknown --parallel {parallel!r}; valid: "
                            f"{', '.join(distributed.MODES)}")
        if nproc < 1:
            raise EdgeError(f"--nproc must be >= 1, got {nproc}")
        if "WORLD_SIZE" not in os.environ and nproc > 1:  # start the group: one worker each
            raise typer.Exit(distributed.launch(_without_launch_options(_ARGV), nproc,
                                                parallel))
        os.environ.setdefault(distributed.ENV_MODE, parallel)  # read by from_env in train()
    if resume and overwrite:
        raise EdgeError("--resume continues the run in OUT, --overwrite replaces it: pick one")
    cfg = TrainConfig(
        rule=rule, data=data, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
        weight_decay=weight_decay, seed=seed, subset=subset, net=net, width=width,
        rule_hparams=parse_hparams(hp), probe_layers=probe_layers, quant=quant, mode=mode,
        views=views, negatives=negatives, head_labels=head_labels, device=device,
        runtime=runtime, profile=profile, per_layer=per_layer,
        alignment=alignment, alignment_every=alignment_every,
    )
    from edge.app.train import train as run

    out = out or Path("runs") / f"{rule}-{Path(data).stem}"
    result = run(cfg, out, data_dir=data_dir, resume=resume, overwrite=overwrite,
                 progress=not as_json)
    if as_json:
        _emit(result)
        return
    t = Table(title=f"{rule} on {result['data']} ({epochs} epochs, {result['seconds']} s)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("probe accuracy (L-BFGS probe)", f"{result['probe_accuracy']:.4f}")
    t.add_row("random-encoder probe", f"{result['random_probe_accuracy']:.4f}")
    t.add_row("probe accuracy (Adam probe, the paper's kind)",
              f"{result['probe_adam_accuracy']:.4f}")
    t.add_row("random-encoder Adam probe", f"{result['random_probe_adam_accuracy']:.4f}")
    if result["head"] and result["head"]["accuracy"] is not None:
        t.add_row(f"on-device head ({result['head']['labels_per_class']} labels a class)",
                  f"{result['head']['accuracy']:.4f}")
    t.add_row("final loss", f"{result['final_loss']:.4f}")
    for k, v in result["parameters"].items():
        t.add_row(f"{k} parameters", f"{v:,}")
    if result["alignment"]:
        t.add_row("alignment per block", " ".join(f"{a:+.3f}" for a in result["alignment"]))
    t.add_row("checkpoint", result["checkpoint"])
    out_console.print(t)


@app.command()
def probe(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint file or run directory.")],
    layers: Annotated[str, typer.Option(help="all | last.")] = "all",
    data_dir: Annotated[str | None, typer.Option(help="Data root (else $EDGE_DATA).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Linear-probe a trained checkpoint on its data set's test split."""
    from edge import checkpoint
    from edge.data import load
    from edge.nets import NetSpec
    from edge.probe import probe_accuracies

    params, _, meta = checkpoint.load(ckpt)
    try:
        net = NetSpec.from_dict(meta["net"])
    except (EdgeError, KeyError, TypeError) as e:
        raise EdgeError(f"{ckpt}: its network is not one this edge reads ({e})") from None
    for k, shape in net.param_shapes().items():
        if k not in params or tuple(params[k].shape) != tuple(shape):
            raise EdgeError(f"{ckpt}: parameter {k} does not match network {net.name!r}")
    cfg = meta["config"]
    if (meta.get("quant") or {}).get("plan"):
        raise EdgeError(f"{ckpt} holds a quantized run; its probe is in its result.json")
    ds = load(cfg["data"], data_dir, cfg["subset"])
    accs = probe_accuracies(net, params, ds, layers)
    result = {
        "checkpoint": str(ckpt),
        "rule": cfg["rule"],
        "data": cfg["data"],
        "epoch": meta["epoch"],
        "probe_layers": layers,
        "probe_accuracy": accs["lbfgs"],
        "probe_adam_accuracy": accs["adam"],
    }
    if as_json:
        _emit(result)
    else:
        out_console.print(
            f"{cfg['rule']} on {cfg['data']} (epoch {meta['epoch']}): probe accuracy "
            f"{accs['lbfgs']:.4f} (L-BFGS), {accs['adam']:.4f} (Adam, the paper's kind)"
        )


@app.command()
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A directory `edge train --out` wrote.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Draw a run's training curve (and alignment, if recorded) as PNG beside it."""
    from edge.app.plot import plot_run

    paths = [str(p) for p in plot_run(run_dir)]
    if as_json:
        _emit({"run": str(run_dir), "plots": paths})
    else:
        out_console.print("\n".join(paths))


@app.command(name="rules")
def list_rules(
    engine: Annotated[str | None, typer.Option(
        help="Show the CLAPP dense update in a neuromorphic learning engine's form: loihi2.")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """List the learning rules: what they are, whether local, what one update holds."""
    from edge import rules

    if engine is not None:
        from quant.loihi import describe_engine, render_engine

        d = describe_engine(engine)
        if as_json:
            _emit(d)
        else:
            out_console.print(render_engine(d), markup=False, highlight=False, soft_wrap=True)
        return
    rows = rules.describe()
    if as_json:
        _emit({"rules": rows})
        return
    t = Table(title="learning rules")
    for col in ("name", "local", "description", "one layer's update holds", "default lr"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], "yes" if r["local"] else "no (global)", r["description"], r["memory"],
                  f"{r['default_lr']:g}")
    out_console.print(t)


@app.command(name="nets")
def list_nets(
    ops: Annotated[bool, typer.Option("--ops", help="List the layer ops a spec file may use.")]
    = False,
    data: Annotated[str, typer.Option(help="Input shape of the presets: digits | mnist | "
                                      "cifar10.")] = "cifar10",
    width: Annotated[float, typer.Option(help="Channel width multiplier.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """List the network presets (blocks, parameters, multiply-adds) or the layer ops."""
    from edge.app.commands import IN_SHAPES
    from edge.nets import PRESETS, preset
    from edge.nets.spec import ops_help

    if ops:
        rows = ops_help()
        if as_json:
            _emit({"ops": rows})
            return
        t = Table(title="layer ops of network spec files (fields; = default)")
        for col in ("op", "fields", "what it is"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["op"], ", ".join(r["fields"]), r["doc"])
        out_console.print(t)
        return
    if data not in IN_SHAPES:
        raise EdgeError(f"unknown data set {data!r}; valid: {', '.join(IN_SHAPES)}")
    rows = []
    for name in PRESETS:
        try:
            net = preset(name, IN_SHAPES[data], width)
        except EdgeError as e:
            rows.append({"name": name, "error": str(e)})
            continue
        rows.append({"name": name, "blocks": len(net.blocks),
                     "parameters": sum(math.prod(s) for s in net.param_shapes().values()),
                     "macs": sum(net.macs()), "output": list(net.shapes()[-1])})
    if as_json:
        _emit({"data": data, "width": width, "nets": rows})
        return
    t = Table(title=f"network presets on {data} inputs {IN_SHAPES[data]} (width {width:g})")
    for col in ("name", "blocks", "parameters", "multiply-adds", "output"):
        t.add_column(col, justify="right" if col != "name" else "left")
    for r in rows:
        if "error" in r:
            t.add_row(r["name"], "-", "-", "-", r["error"])
        else:
            t.add_row(r["name"], str(r["blocks"]), f"{r['parameters']:,}", f"{r['macs']:,}",
                      "x".join(map(str, r["output"])))
    out_console.print(t)


def _without_launch_options(argv: list[str]) -> list[str]:
    """The command line a worker runs: this one without --nproc (the launcher's)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


@app.command()
def demo(
    epochs: Annotated[int, typer.Option(help="Pretraining epochs.")] = 15,
    out: Annotated[
        Path | None, typer.Option(help="Where the runs go (default: a temp dir).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """A device meets a shift: local pretraining, the on-device head, batch-1 adaptation, and
    the step's memory against backprop's (embedded digits, about a minute)."""
    if epochs < 1:
        raise EdgeError(f"--epochs must be positive, got {epochs}")
    from edge.app.demo import run

    r = run(out or Path(tempfile.mkdtemp(prefix="edge-demo-")), epochs, progress=not as_json)
    if as_json:
        _emit(r)
        return
    pre, sh, mem = r["pretrain"], r["shift"], r["memory"]
    t = Table(title=f"edge demo: {r['net']}, {r['rule']}, {r['epochs']} epochs, "
              f"{r['labels_per_class']} labels a class, {r['seconds']} s")
    t.add_column("clean digits, few labels")
    t.add_column("accuracy", justify="right")
    t.add_row("head from the labels, untrained encoder", f"{pre['head_untrained_encoder']:.3f}")
    t.add_row("head from the labels, locally trained encoder",
              f"{pre['head_trained_encoder']:.3f}")
    t.add_row("head learned in the training step", f"{pre['head_in_step']:.3f}")
    t.add_row("linear probe, all labels: untrained / trained",
              f"{pre['probe_untrained_encoder']:.3f} / {pre['probe_trained_encoder']:.3f}")
    t.add_section()
    t.add_row("[b]inverted digits[/b]", "")
    t.add_row("no adaptation", f"{sh['no_adaptation']:.3f}")
    t.add_row(f"adapted on the device: batch 1, {sh['stream_images']} images "
              f"({sh['labelled_stream_images']} labelled), {sh['samples_per_second']} img/s",
              f"{sh['adapted_on_device']:.3f}")
    t.add_row("head re-learned from those labels, frozen encoder",
              f"{sh['head_relearned_frozen_encoder']:.3f}")
    t.add_section()
    t.add_row(f"[b]memory on {mem['target']}[/b]", "bytes")
    t.add_row(f"local integer step, batch 1 (fits: {'yes' if mem['local_fits'] else 'no'})",
              f"{mem['local_integer_step_bytes']:,}")
    t.add_row(f"backprop InfoNCE, batch 2 (fits: {'yes' if mem['backprop_fits'] else 'no'})",
              f"{mem['backprop_bytes_batch_2']:,}")
    out_console.print(t)
    out_console.print(f"runs in {r['runs']}")


def _mount_subcommands() -> None:
    """Sub-apps that live in edge.app.commands (one module per command family)."""
    from edge.app.commands.targets import app as targets_app

    app.add_typer(targets_app, name="targets", help="Device targets: list | show.")
    from edge.app.commands.export import export_cmd
    from edge.app.commands.simulate import simulate_cmd

    app.command(name="simulate")(simulate_cmd)
    app.command(name="export")(export_cmd)


_mount_subcommands()


_ARGV: list[str] = []  # this invocation's arguments (what `train --nproc` relaunches)


def main(argv: list[str] | None = None) -> None:
    from edge.errors import Interrupted

    _ARGV[:] = sys.argv[1:] if argv is None else list(argv)
    try:
        app(args=argv, prog_name="edge")
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(130)
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (nothing was being saved)", file=sys.stderr)
        sys.exit(130)

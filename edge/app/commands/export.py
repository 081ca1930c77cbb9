"""`edge export`: write a training bundle (ONNX step graphs + manifest + state), or check one.

    edge export --rule clapp++ --data digits --width 0.25 --batch-size 16 --per-layer -o DIR
    edge export --check DIR [--json]
    edge export ... --quant int8-w16 --mode integer   the integer step (scales calibrated on 4
                                            batches of --data), integer infer.onnx
    edge export ... --profile npu           graphs in the npu operator profile (export.profile)
    edge export ... --compile iree          + IREE: host module, parity check, static library
                                            for the target's cpu, code size vs flash

Mounted by the CLI as `app.command(name="export")(export_cmd)`. Every failure is an
EdgeError (the CLI prints one line and exits 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from edge.app.commands import IN_SHAPES, parse_hparams
from edge.errors import EdgeError


def _target_warnings(target: Any, quant: dict | None) -> list[str]:
    if target is None or quant is not None or "fp32" in target.dtypes:
        return []
    return [f"target {target.name!r} lists no fp32 ({', '.join(target.dtypes)}): this fp32 "
            "bundle will not run natively there; integer mode is needed"]


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        if isinstance(value, list):
            value = ", ".join(map(str, value)) or "-"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        typer.echo(f"{key:>14}: {value}")


def _export_nir(run: Path | None, out: Path | None, data_dir: str | None,
                subset: int | None) -> dict[str, Any]:
    """A trained run's encoder as IF neurons in a NIR file (export.nir), thresholds from the
    activations of its own training data (the first `subset` images, default 256)."""
    if run is None or out is None:
        raise EdgeError("--format nir needs --checkpoint RUN (a trained run) and -o FILE.nir")
    from edge import checkpoint
    from edge.data import load, to_float
    from edge.nets import NetSpec
    from export.nir import write_nir

    params, _, meta = checkpoint.load(run)
    cfg = meta.get("config", {})
    ds = load(cfg.get("data", "digits"), data_dir, subset or 256)
    net = NetSpec.from_dict(meta["net"], tuple(meta.get("data_shape") or ds.in_shape))
    calib = to_float(ds.x_train[: subset or 256], ds)
    graph = write_nir(out, net, {k: v for k, v in params.items() if k.startswith("enc.")},
                      calib)
    kinds: dict[str, int] = {}
    for node in graph.nodes.values():
        kinds[type(node).__name__] = kinds.get(type(node).__name__, 0) + 1
    return {"nir": str(out), "checkpoint": str(run), "net": net.name,
            "calibration_images": int(calib.shape[0]), "nodes": dict(sorted(kinds.items()))}


def export_cmd(
    out: Annotated[Path | None, typer.Option("-o", "--out", help="Bundle directory to write.")]
    = None,
    check: Annotated[Path | None, typer.Option(help="Validate the bundle in DIR instead.")]
    = None,
    target: Annotated[str | None, typer.Option(help="Device target name or .toml file.")] = None,
    rule: Annotated[str, typer.Option(help="Local learning rule.")] = "clapp++",
    data: Annotated[str, typer.Option(help="digits | mnist | cifar10 or a data path (sets the "
                                      "input shape; calibrates --quant int8*).")] = "digits",
    net: Annotated[str | None, typer.Option(help="Preset or a .toml network spec.")] = None,
    subset: Annotated[int | None, typer.Option(
        help="Calibrate on the first N training images (as `edge train --subset`).")] = None,
    width: Annotated[float, typer.Option(help="Channel width multiplier.")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="Images per step (fixed in the graph).")] = 64,
    optimizer: Annotated[str, typer.Option(help="adamw | sgd.")] = "adamw",
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: the rule's).")]
    = None,
    weight_decay: Annotated[float, typer.Option(help="Decoupled (AdamW) or L2 (SGD).")] = 0.0,
    hp: Annotated[list[str], typer.Option(help="Rule hyper-parameter key=value.")] = [],  # noqa: B006
    negatives: Annotated[str, typer.Option(
        help="batch | memory:K (as edge train: the last K codes, bound as step state).")]
    = "batch",
    seed: Annotated[int, typer.Option(help="Seed of the initial weights.")] = 0,
    per_layer: Annotated[bool, typer.Option(help="Also write one step graph per layer.")]
    = False,
    profile: Annotated[str, typer.Option(help="Operator profile: plain | npu (same numbers).")]
    = "plain",
    compile_with: Annotated[str | None, typer.Option(
        "--compile", help="Compile the step: iree (host + the target's cpu).")] = None,
    quant: Annotated[str, typer.Option(help="Weights: fp32 | int8 | int8-w16.")] = "fp32",
    mode: Annotated[str, typer.Option(help="With --quant int8*: integer (qat does not "
                                      "export: its step is fp32).")] = "integer",
    data_dir: Annotated[str | None, typer.Option(
        help="Data root for calibrating --quant int8* (else $EDGE_DATA).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="bundle (the ONNX training step) | nir "
                                     "(a trained encoder as a spiking NIR graph).")] = "bundle",
    from_run: Annotated[Path | None, typer.Option(
        "--checkpoint", help="--format nir: the trained run (an `edge train` output dir).")]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Export a local rule's training step as ONNX (a bundle a device trains with), or check one;
    or a trained encoder as a NIR graph (--format nir)."""
    from export.bundle import check_bundle, summary, write_bundle

    if fmt not in ("bundle", "nir"):
        raise EdgeError(f"unknown --format {fmt!r}; valid: bundle, nir")
    if fmt == "nir":
        _print(_export_nir(from_run, out, data_dir, subset), as_json)
        return
    if (out is None) == (check is None):
        raise EdgeError("give either -o DIR (write a bundle) or --check DIR (validate one)")
    if check is not None:
        manifest = check_bundle(check)
        _print({"bundle": str(check), "ok": True, **summary(manifest)}, as_json)
        return
    from edge.app.config import TrainConfig
    from export.profile import check_profile, profile_bundle

    check_profile(profile)
    if compile_with not in (None, "iree"):
        raise EdgeError(f"unknown compiler {compile_with!r}; valid: iree")
    if compile_with == "iree":
        from export.iree import _compiler, _runtime

        _compiler()  # a missing extra fails before the export, not after
        _runtime()
    tgt = None
    if target is not None:
        import targets

        tgt = targets.load(target)
    cfg = TrainConfig(rule=rule, data=data, batch_size=batch_size, lr=lr, optimizer=optimizer,
                      weight_decay=weight_decay, seed=seed, net=net, width=width, subset=subset,
                      rule_hparams=parse_hparams(hp), quant=quant, mode=mode,
                      negatives=negatives)
    if quant != "fp32" and mode != "integer":
        raise EdgeError(f"--mode {mode} trains fp32 latent weights with an fp32 step; export "
                        "--mode integer, or --quant fp32 for the float step")
    from edge.app.train import build, calibration, optim
    from export.step import fp32_program, integer_program, require_local

    in_shape = IN_SHAPES.get(data)
    ds = None
    if quant != "fp32" or in_shape is None:
        from edge.data import load

        ds = load(data, data_dir, subset)
        in_shape = ds.in_shape
    spec, learning_rule, params = build(cfg, in_shape)
    require_local(learning_rule)
    opt = optim(cfg)
    if quant == "fp32":
        from edge.step import init_state

        program = fp32_program(spec, learning_rule, opt)
        state = init_state(spec, learning_rule, opt, params)
    else:
        from quant.calibrate import make_plan
        from quant.integer import rule_state

        calib = calibration(cfg, ds)
        plan, params = make_plan(spec, learning_rule, params, calib, quant, opt.lr)
        program = integer_program(spec, learning_rule, plan, params)
        import torch

        state = {"step": torch.zeros((), dtype=torch.int64),
                 **rule_state(spec, learning_rule.integer_form(spec), plan, params)}
    assert out is not None
    if ds is None:  # the views' normalisation for the manifest, when the files are at hand
        from edge.data import load

        try:
            ds = load(data, data_dir, subset)
        except EdgeError:
            if data_dir is not None:
                raise  # a --data-dir given is used as given, never skipped
            ds = None  # an fp32 step needs no data; the manifest then says normalisation null
    manifest = write_bundle(out, spec, learning_rule, program, params, state, batch_size,
                            target=tgt, per_layer=per_layer,
                            normalisation=(ds.mean, ds.std) if ds is not None else None)
    profile_bundle(out, profile)
    result = {"bundle": str(out), **summary(manifest), "profile": profile,
              "warnings": _target_warnings(tgt, manifest.quant)}
    if compile_with == "iree":
        from export.iree import compile_bundle

        result["iree"] = compile_bundle(out, tgt)
    if as_json:
        _print(result, as_json)
        return
    iree = result.pop("iree", None)
    _print(result, as_json)
    if iree is not None:
        from edge.sim.report import render_code_size

        render_code_size(iree)

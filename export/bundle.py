"""Bundles: everything a device needs to train with nothing but an inference runtime.

    write_bundle(dir, net, rule, program, params, state, batch_size, target=None,
                 per_layer=False, normalisation=None) -> Manifest
    check_bundle(dir) -> Manifest       one-line EdgeError on the first thing that is wrong

A bundle directory holds
    train_step.onnx               the whole training step
    layers/layer_{i}.onnx         per-block step graphs (with per_layer=True)
    infer.onnx                    the encoder, weights as inputs named like the step's params:
                                  fp32, or in integer mode the integer network (int8 x in,
                                  uint8 codes out, integer ops only)
    state.npz                     initial values of every bound input (params/*, state/*)
    train_with_onnxruntime.py     reference driver: numpy + onnxruntime + the manifest
    manifest.json                 edge-bundle/2 (`export.manifest`): interfaces, bindings,
                                  every non-bound input defined (`feeds`), what the step runs

Integrity: manifest.json carries its own sha256 (`manifest_sha256`) and the sha256 of every
other file (`files`), so its digest covers the whole bundle. Each training graph also
records, in its ONNX metadata under `edge.step`, the description of the step it was traced
from (rule, hparams, optimizer, net, batch_size, quant, feeds, its own file name); a manifest
that says anything else about that graph is refused even with a recomputed digest.

`check_bundle` refuses (one line each), in this order:
  manifest   unreadable; a field missing or mistyped (named: 'step.inputs[3].dtype');
             another format; edited after export (its manifest_sha256)
  files      missing, or not matching their sha256; a graph onnx.checker rejects, or whose
             inputs and outputs differ from the manifest's
  bindings   in every training graph: a binding that is not new_X -> X (same name, shape,
             dtype), a new_* output or params/state input left unbound, anything bound twice,
             an input that is neither bound nor a feed, an output neither bound nor a metric;
             block graphs that do not partition the whole step's bindings, lack state/step,
             or do not chain (block i's x is block i-1's y)
  optimizer  not the update the step runs: fp32, an OptimConfig whose m./v. state inputs are
             exactly adamw's m. and v. (sgd: m.) of every parameter, shaped like it, plus a
             float32 state/step; integer, the plan's IntegerUpdate, the plan's parameters and
             store dtypes those of the step, an int64 state/step, no m./v. (any other state/*
             is the rule's own, e.g. a memory of negatives, bound like the rest)
  feeds      x1, x2 not batch_size rows of net.in_shape in the step's dtype, or unlike
             feeds.views (integer: quantization at the plan's f_in, half to even, clipped
             int8); feeds.random_bits not exactly the noise/* inputs (sorted, int32, uniform
             in [0, 65536), fresh); feeds.chain unlike the block graphs
  record     a training graph whose `edge.step` record differs from the manifest
  state      a state.npz that is not exactly the bound inputs with their shapes and dtypes;
             an infer.onnx whose weights are not the step's parameters
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from torch import Tensor

from edge.errors import EdgeError
from edge.nets import NetSpec
from export.inference import encoder_graph, integer_encoder_graph
from export.manifest import (
    NEW_PARAMS,
    NEW_STATE,
    NOISE,
    NOISE_DTYPE,
    NOISE_HIGH,
    NOISE_LOW,
    PARAMS,
    STATE,
    VIEWS,
    X_CLIP,
    GraphIO,
    Manifest,
    TensorSpec,
    binding_problem,
    chain_feed,
    feed,
    normalisation_feed,
    random_bits_feed,
    require,
    views_feed,
)
from export.step import StepProgram, block_graphs, step_graph
from export.trace import check_model, value_specs

MANIFEST = "manifest.json"
STATE_FILE = "state.npz"
SCRIPT = "train_with_onnxruntime.py"
RECORD_KEY = "edge.step"  # ONNX metadata of every training graph: the step it runs
RECORDED = ("rule", "hparams", "optimizer", "net", "batch_size", "quant", "feeds")
STEP_COUNTER = STATE + "step"
OPTIMIZER_STATE = ("m", "v")  # state/m.<param>, state/v.<param>: moments of the update
_SCRIPT_SOURCE = Path(__file__).with_name("standalone.py")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _target_dict(target: Any) -> dict[str, Any] | None:
    if target is None or isinstance(target, dict):
        return target
    if hasattr(target, "to_dict"):
        return target.to_dict()
    return {"name": str(target)}


def _check_dir(out: Path) -> None:
    """A new or empty directory, or an earlier bundle (overwritten); nothing else."""
    if out.exists() and not out.is_dir():
        raise EdgeError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise EdgeError(f"{out} is not empty and holds no bundle; choose another directory")


def _prepare_dir(out: Path) -> None:
    _check_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "layers").is_dir():
        shutil.rmtree(out / "layers")  # stale per-layer graphs of an earlier bundle


def write_state(
    path: Path, io: GraphIO, params: dict[str, Tensor], state: dict[str, Tensor]
) -> None:
    """The initial value of every bound input, keyed by graph input name."""
    values = {PARAMS + k: v for k, v in params.items()}
    values.update({STATE + k: v for k, v in state.items()})
    arrays = {name: values[name].detach().cpu().numpy() for name in io.bound_inputs}
    np.savez(path, **arrays)


def _noise_names(ios: Sequence[GraphIO]) -> list[str]:
    return sorted({t.name for io in ios for t in io.inputs if t.name.startswith(NOISE)})


def _record(manifest: Manifest, file: str) -> dict[str, Any]:
    d = manifest.to_dict()
    return {"graph": file, **{k: d[k] for k in RECORDED}}


def _stamp(model: onnx.ModelProto, record: dict[str, Any]) -> None:
    keep = [(p.key, p.value) for p in model.metadata_props if p.key != RECORD_KEY]
    del model.metadata_props[:]
    for key, value in [*keep, (RECORD_KEY, json.dumps(record))]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def write_bundle(
    out: str | Path,
    net: NetSpec,
    rule: Any,
    program: StepProgram,
    params: dict[str, Tensor],
    state: dict[str, Tensor],
    batch_size: int,
    target: Any = None,
    per_layer: bool = False,
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Manifest:
    """Write the bundle; `normalisation` = (mean, std) per channel of the data the views
    come from (pixel / 255 - mean) / std, recorded in feeds.views (None: not known)."""
    out = Path(out)
    _check_dir(out)
    norm = None
    if normalisation is not None:
        mean, std = normalisation
        if not len(mean) == len(std) == net.in_shape[0] or min(std) <= 0:
            raise EdgeError(f"normalisation needs {net.in_shape[0]} means and positive stds, "
                            f"got {len(mean)} and {list(std)}")
        norm = normalisation_feed(mean, std)
    model, manifest = step_graph(net, rule, program, params, state, batch_size,
                                 target=_target_dict(target))
    layer_models: list[onnx.ModelProto] = []
    layer_ios: list[GraphIO] = []
    if per_layer:
        layer_models, layer_ios = block_graphs(net, rule, program, params, state, batch_size)
    if manifest.quant is None:
        infer, infer_io = encoder_graph(net, params, outputs="all", weights="inputs")
        f_in = None
    else:  # integer mode: its own network, on the integer stores the step trains
        from quant.plan import QuantPlan

        plan = QuantPlan.from_dict(manifest.quant["plan"])
        infer, infer_io = integer_encoder_graph(net, plan, params, outputs="all")
        f_in = plan.f_in
    streams = 0
    if layer_ios:
        streams = int(next(t for t in layer_ios[0].outputs if t.name == "y").shape[0])
    feeds = {"views": views_feed(manifest.step.input("x1"), norm, f_in),
             "random_bits": random_bits_feed(_noise_names([manifest.step, *layer_ios]),
                                             list(params)),
             "chain": chain_feed(len(layer_ios), streams // batch_size)}
    manifest = manifest.with_(feeds=feeds, layers=tuple(layer_ios), infer=infer_io,
                              state_file=STATE_FILE)
    _prepare_dir(out)
    for m, io in zip([model, *layer_models], [manifest.step, *layer_ios], strict=True):
        _stamp(m, _record(manifest, io.file))
        (out / io.file).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(m, out / io.file)
    onnx.save(infer, out / infer_io.file)
    write_state(out / STATE_FILE, manifest.step, params, state)
    shutil.copyfile(_SCRIPT_SOURCE, out / SCRIPT)
    files = [manifest.step.file, *(io.file for io in layer_ios), infer_io.file, STATE_FILE,
             SCRIPT]
    manifest = manifest.with_(files={f: sha256(out / f) for f in files})
    (out / MANIFEST).write_text(manifest.to_json())
    return manifest


# ------------------------------------------------------------------------------ checking


def read_manifest(out: str | Path) -> Manifest:
    """The manifest, its fields and its own digest checked (`Manifest.from_json`)."""
    path = Path(out) / MANIFEST
    if not Path(out).is_dir():
        raise EdgeError(f"no bundle directory at {out}")
    if not path.is_file():
        raise EdgeError(f"{out} has no {MANIFEST}; not an edge bundle")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeError(f"{MANIFEST} is unreadable ({type(e).__name__})") from None
    return Manifest.from_json(text)


def _check_hashes(out: Path, manifest: Manifest) -> None:
    needed = {g.file for g in manifest.graphs()} | {manifest.state_file or STATE_FILE}
    unlisted = sorted(needed - set(manifest.files))
    if unlisted:
        raise EdgeError(f"manifest lists no sha256 for {', '.join(unlisted)}")
    for rel, digest in manifest.files.items():
        path = out / rel
        if not path.is_file():
            raise EdgeError(f"bundle file {rel} is missing from {out}")
        if sha256(path) != digest:
            raise EdgeError(f"bundle file {rel} does not match its sha256 in the manifest "
                            "(corrupted or modified)")


def _diff(what: str, declared: tuple, actual: tuple) -> str | None:
    d = {t.name: t for t in declared}
    a = {t.name: t for t in actual}
    if list(d) != list(a):
        missing, extra = sorted(set(d) - set(a)), sorted(set(a) - set(d))
        if missing or extra:
            return f"{what}: manifest-only {missing or '-'}, graph-only {extra or '-'}"
        return f"{what}: order differs"
    for name, t in d.items():
        if (t.shape, t.dtype) != (a[name].shape, a[name].dtype):
            return (f"{what} {name}: manifest says {t.dtype}{list(t.shape)}, "
                    f"graph has {a[name].dtype}{list(a[name].shape)}")
    return None


def _check_graph(out: Path, io: GraphIO) -> dict[str, str]:
    """Load, check and compare one graph; its metadata."""
    try:
        model = onnx.load(str(out / io.file))
    except (DecodeError, OSError, ValueError) as e:
        raise EdgeError(f"{io.file} is not a readable ONNX model ({type(e).__name__})") from None
    try:
        check_model(model)
    except EdgeError as e:
        raise EdgeError(f"{io.file}: {e}") from None
    for what, declared, values in (("inputs", io.inputs, model.graph.input),
                                   ("outputs", io.outputs, model.graph.output)):
        problem = _diff(what, declared, value_specs(values))
        if problem:
            raise EdgeError(f"{io.file} and the manifest disagree on {problem}")
    return {p.key: p.value for p in model.metadata_props}


def _specs(io: GraphIO, prefix: str) -> dict[str, TensorSpec]:
    return {t.name[len(prefix):]: t for t in io.inputs if t.name.startswith(prefix)}


def _check_interface(io: GraphIO, block: int | None, blocks: int) -> None:
    """Bindings complete and by name; only declared inputs and outputs (`block` None: the
    whole step)."""
    shared = (STEP_COUNTER,) if block is not None and block < blocks - 1 else ()
    problem = binding_problem(io, shared)
    if problem:
        raise EdgeError(f"{io.file}: {problem}")
    views = VIEWS if block in (None, 0) else ("x",)
    for t in io.inputs:
        if not (t.name.startswith((PARAMS, STATE, NOISE)) or t.name in views):
            raise EdgeError(f"{io.file}: input {t.name} is neither bound nor a feed")
    missing = [v for v in views if v not in {t.name for t in io.inputs}]
    if missing:
        raise EdgeError(f"{io.file} takes no {missing[0]}")
    metrics = ("loss", "layer_loss") if block is None else ("y", "loss")
    outs = {t.name: t for t in io.outputs}
    for t in io.outputs:
        if not (t.name.startswith((NEW_PARAMS, NEW_STATE)) or t.name in metrics):
            raise EdgeError(f"{io.file}: output {t.name} is neither bound nor a metric")
    for name in metrics:
        if name not in outs:
            raise EdgeError(f"{io.file} returns no {name}")
    if outs["loss"].shape != () or outs["loss"].dtype != "float32":
        raise EdgeError(f"{io.file}: loss must be a float32 scalar")
    if block is None and outs["layer_loss"].shape != (blocks,):
        raise EdgeError(f"{io.file}: layer_loss has shape {list(outs['layer_loss'].shape)}, "
                        f"the network has {blocks} blocks")


def _check_layers(manifest: Manifest, blocks: int) -> None:
    """The block graphs partition the whole step's bindings and chain y -> x."""
    if not manifest.layers:
        return
    if len(manifest.layers) != blocks:
        raise EdgeError(f"manifest has {len(manifest.layers)} per-block graphs for a network "
                        f"of {blocks} blocks")
    step = {t.name: t for t in (*manifest.step.inputs, *manifest.step.outputs)}
    owner: dict[tuple[str, str], str] = {}
    prev_y: TensorSpec | None = None
    for i, io in enumerate(manifest.layers):
        _check_interface(io, i, blocks)
        for t in (*io.inputs, *io.outputs):
            if t.name in ("x", "y", "loss"):
                continue
            if t.name not in step:
                raise EdgeError(f"{io.file}: {t.name} is not a tensor of the whole step")
            if (t.shape, t.dtype) != (step[t.name].shape, step[t.name].dtype):
                raise EdgeError(f"{io.file}: {t.name} differs from the whole step's")
        for b in io.bindings:
            if b in owner:
                raise EdgeError(f"{io.file}: binding {b[0]} -> {b[1]} is also in {owner[b]}")
            owner[b] = io.file
        if STEP_COUNTER in manifest.step.bound_inputs:
            if STEP_COUNTER not in {t.name for t in io.inputs}:
                raise EdgeError(f"{io.file} takes no {STEP_COUNTER} (the count before the step)")
            counts = NEW_STATE + "step" in {t.name for t in io.outputs}
            if counts and i < blocks - 1:
                raise EdgeError(f"{io.file}: only the last block graph returns new_state/step")
            if not counts and i == blocks - 1:
                raise EdgeError(f"{io.file} (the last block graph) returns no new_state/step")
        if prev_y is not None:
            x = io.input("x")
            if (x.shape, x.dtype) != (prev_y.shape, prev_y.dtype):
                raise EdgeError(f"{io.file}: x is {x.dtype}{list(x.shape)}, the previous "
                                f"block's y is {prev_y.dtype}{list(prev_y.shape)}")
        prev_y = next(t for t in io.outputs if t.name == "y")
    missing = sorted(set(manifest.step.bindings) - set(owner))
    if missing:
        raise EdgeError(f"no per-block graph carries the binding {missing[0][0]} -> "
                        f"{missing[0][1]}")
    extra = sorted(set(owner) - set(manifest.step.bindings))
    if extra:
        raise EdgeError(f"{owner[extra[0]]}: binding {extra[0][0]} -> {extra[0][1]} is not "
                        "the whole step's")


def _in_shape(manifest: Manifest) -> tuple[int, ...]:
    shape = manifest.net.get("in_shape")
    if not (isinstance(shape, list) and shape and all(type(s) is int for s in shape)):
        raise EdgeError("manifest field 'net.in_shape' must be a list of integers")
    return tuple(shape)


def _check_optimizer_state(name: str, params: dict[str, TensorSpec],
                           state: dict[str, TensorSpec], kinds: tuple[str, ...],
                           counter: str) -> None:
    """The optimizer's state inputs are exactly the step counter and `kinds` (m., v.) of
    every parameter, shaped like it; any other state/* is the rule's own (its memory of
    negatives), carried like the rest."""
    step = state.get("step")
    if step is None or (step.shape, step.dtype) != ((), counter):
        raise EdgeError(f"optimizer {name} needs a {counter} scalar state/step")
    mine = {k for k in state if k.split(".", 1)[0] in OPTIMIZER_STATE and "." in k}
    want = {f"{kind}.{k}" for kind in kinds for k in params}
    missing, extra = sorted(want - mine), sorted(mine - want)
    if missing:
        raise EdgeError(f"optimizer {name} needs the state input state/{missing[0]}; the step "
                        "takes none")
    if extra:
        raise EdgeError(f"optimizer {name} keeps no state/{extra[0]}, yet the step takes it")
    for k in sorted(want):
        t, p = state[k], params[k.split(".", 1)[1]]
        if (t.shape, t.dtype) != (p.shape, p.dtype):
            raise EdgeError(f"state/{k} is {t.dtype}{list(t.shape)}, not the shape and dtype "
                            f"of params/{k.split('.', 1)[1]}")


def _check_fp32(manifest: Manifest) -> None:
    from edge.optim import OptimConfig

    opt = manifest.optimizer
    fields = [f.name for f in dataclasses.fields(OptimConfig)]
    for name in fields:
        if name not in opt:
            raise EdgeError(f"manifest lacks the field 'optimizer.{name}'")
    unknown = sorted(set(opt) - set(fields))
    if unknown:
        raise EdgeError(f"manifest field 'optimizer.{unknown[0]}' is no fp32 optimizer's")
    cfg = OptimConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in opt.items()})
    params, state = _specs(manifest.step, PARAMS), _specs(manifest.step, STATE)
    kinds = ("m", "v") if cfg.name == "adamw" else ("m",)
    _check_optimizer_state(cfg.name, params, state, kinds, "float32")
    if _noise_names(manifest.graphs()):
        raise EdgeError("an fp32 step rounds deterministically, yet the graphs take noise/* "
                        "inputs")


def _check_integer(manifest: Manifest) -> Any:
    """The integer plan against the graphs; the plan."""
    from quant.integer import IntegerUpdate
    from quant.plan import QuantPlan

    quant = manifest.quant or {}
    mode = require(quant, "mode", "quant", str)
    if mode != "integer":
        raise EdgeError(f"manifest quant mode {mode!r} does not export; only 'integer' does")
    raw = require(quant, "plan", "quant", dict)
    for key in ("quant", "rule", "batch", "f_in", "exps", "params", "lr"):
        require(raw, key, "quant.plan")
    plan = QuantPlan.from_dict(raw)
    if plan.rule != manifest.rule:
        raise EdgeError(f"the integer plan is for rule {plan.rule!r}, the manifest says "
                        f"{manifest.rule!r}")
    if plan.batch != manifest.batch_size:
        raise EdgeError(f"the integer plan is for batch {plan.batch}, the manifest says "
                        f"batch_size {manifest.batch_size}")
    params, state = _specs(manifest.step, PARAMS), _specs(manifest.step, STATE)
    if set(plan.params) != set(params):
        odd = sorted(set(plan.params) ^ set(params))[0]
        raise EdgeError(f"the integer plan and the step disagree on parameter {odd}")
    for name, pp in plan.params.items():
        if params[name].dtype != pp.dtype:
            raise EdgeError(f"params/{name} is {params[name].dtype}, the plan stores {pp.dtype}")
    _check_optimizer_state("integer-sgd", params, state, (), "int64")
    want = IntegerUpdate(plan).describe()
    if manifest.optimizer != want:
        why = _first_difference(manifest.optimizer, want, "optimizer")
        raise EdgeError(f"manifest optimizer {manifest.optimizer.get('name')!r} is not the "
                        f"integer step's update {want['name']!r} ({why})")
    noise = set(_noise_names(manifest.graphs()))
    for name in sorted(plan.params):
        if NOISE + name not in noise:
            raise EdgeError(f"the integer step takes no {NOISE}{name} for its update's rounding")
    for name in sorted(noise - {NOISE + k for k in plan.params}):
        if not name.startswith(NOISE + "err."):
            raise EdgeError(f"noise input {name} rounds nothing the plan knows")
    return plan


def _check_views(manifest: Manifest, plan: Any) -> None:
    x1 = manifest.step.input("x1") if "x1" in {t.name for t in manifest.step.inputs} else None
    if x1 is None:
        raise EdgeError(f"{manifest.step.file} takes no x1")
    x2 = manifest.step.input("x2")
    if (x1.shape, x1.dtype) != (x2.shape, x2.dtype):
        raise EdgeError(f"x1 is {x1.dtype}{list(x1.shape)} but x2 {x2.dtype}{list(x2.shape)}")
    if x1.shape[:1] != (manifest.batch_size,):
        raise EdgeError(f"manifest batch_size is {manifest.batch_size}, the graphs take x1, x2 "
                        f"of {x1.shape[0]} rows")
    if x1.shape[1:] != _in_shape(manifest):
        raise EdgeError(f"x1 is {list(x1.shape)}, not batch_size x net.in_shape")
    dtype = "int8" if plan is not None else "float32"
    if x1.dtype != dtype:
        raise EdgeError(f"x1 is {x1.dtype}; this step takes {dtype} views")
    feed(manifest, "views", kind=dict)
    for key, want in (("inputs", list(VIEWS)), ("dtype", x1.dtype), ("shape", list(x1.shape))):
        got = feed(manifest, "views", key)
        if got != want:
            raise EdgeError(f"feeds.views.{key} is {got}, the graphs take {want}")
    norm = feed(manifest, "views", "normalisation", kind=(dict, type(None)))
    if norm is not None:
        c = _in_shape(manifest)[0]
        mean = feed(manifest, "views", "normalisation", "mean", kind=list)
        std = feed(manifest, "views", "normalisation", "std", kind=list)
        if len(mean) != c or len(std) != c or not all(
                isinstance(s, (int, float)) and s > 0 for s in std):
            raise EdgeError(f"feeds.views.normalisation needs {c} means and {c} positive stds")
    q = feed(manifest, "views", "quantization", kind=(dict, type(None)))
    if plan is None:
        if q is not None:
            raise EdgeError("feeds.views.quantization is set for an fp32 bundle")
        return
    if q is None:
        raise EdgeError("feeds.views.quantization is null for an integer bundle (int8 views)")
    for key, want in (("scale_exponent", plan.f_in), ("rounding", "half_to_even"),
                      ("clip", list(X_CLIP)), ("dtype", "int8")):
        got = feed(manifest, "views", "quantization", key)
        if got != want:
            raise EdgeError(f"feeds.views.quantization.{key} is {got!r}, the step takes "
                            f"{want!r}")


def _check_random_bits(manifest: Manifest) -> None:
    names = _noise_names([manifest.step, *manifest.layers])
    bits = feed(manifest, "random_bits", kind=(dict, type(None)))
    legacy = {"low": NOISE_LOW, "high": NOISE_HIGH} if names else None
    if manifest.noise != legacy:
        raise EdgeError(f"manifest noise is {manifest.noise}, the graphs need {legacy}")
    if not names:
        if bits is not None:
            raise EdgeError("feeds.random_bits is set, yet no graph takes noise/* inputs")
        return
    if bits is None:
        raise EdgeError(f"feeds.random_bits is null, yet the graphs take {names[0]} and more")
    listed = feed(manifest, "random_bits", "inputs", kind=list)
    if listed != names:
        odd = sorted(set(listed) ^ set(names))
        raise EdgeError("feeds.random_bits.inputs " + (
            f"and the graphs differ on {odd[0]}" if odd else "are not in sorted order"))
    for key, want in (("dtype", NOISE_DTYPE), ("low", NOISE_LOW), ("high", NOISE_HIGH),
                      ("fresh", True), ("distribution", "uniform integers")):
        got = feed(manifest, "random_bits", key)
        if got != want or type(got) is not type(want):
            raise EdgeError(f"feeds.random_bits.{key} is {got!r}; the step's stochastic "
                            f"rounding needs {want!r}")
    purpose = feed(manifest, "random_bits", "purpose", kind=dict)
    if sorted(purpose) != names:
        raise EdgeError("feeds.random_bits.purpose must name exactly the noise inputs")
    feed(manifest, "random_bits", "reference", "generator", kind=str)
    for io in manifest.graphs():
        for t in io.inputs:
            if t.name.startswith(NOISE) and t.dtype != NOISE_DTYPE:
                raise EdgeError(f"{io.file}: {t.name} is {t.dtype}, not {NOISE_DTYPE}")
    if manifest.layers and _noise_names(manifest.layers) != _noise_names([manifest.step]):
        raise EdgeError("the per-block graphs and the whole step take different noise inputs")


def _check_chain(manifest: Manifest) -> None:
    chain = feed(manifest, "chain", kind=(dict, type(None)))
    if (chain is None) != (not manifest.layers):
        raise EdgeError("feeds.chain must be set exactly when the bundle has per-block graphs")
    if chain is None:
        return
    rows = next(t for t in manifest.layers[0].outputs if t.name == "y").shape[0]
    streams = rows // manifest.batch_size if isinstance(rows, int) else 0
    for key, want in (("input", "x"), ("output", "y"), ("blocks", len(manifest.layers)),
                      ("streams", streams)):
        got = feed(manifest, "chain", key)
        if got != want:
            raise EdgeError(f"feeds.chain.{key} is {got!r}, the graphs use {want!r}")


def _first_difference(a: Any, b: Any, path: str) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<none>") != b.get(k, "<none>"):
                return _first_difference(a.get(k, "<none>"), b.get(k, "<none>"), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for j, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{path}[{j}]")
    shown = [json.dumps(v)[:60] for v in (a, b)]
    return f"{path} {shown[0]} vs {shown[1]}"


def _check_records(manifest: Manifest, records: dict[str, dict[str, str]]) -> None:
    """Each training graph's own `edge.step` record equals what the manifest says."""
    for io in (manifest.step, *manifest.layers):
        raw = records[io.file].get(RECORD_KEY)
        if raw is None:
            raise EdgeError(f"{io.file} carries no {RECORD_KEY} record (not written by edge "
                            "export)")
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            raise EdgeError(f"{io.file}: its {RECORD_KEY} record is not JSON") from None
        want = _record(manifest, io.file)
        if record != want:
            raise EdgeError(f"the manifest does not describe the step {io.file} was exported "
                            f"as: {_first_difference(want, record, 'manifest')} (graph)")


def _check_state(out: Path, manifest: Manifest) -> None:
    rel = manifest.state_file or STATE_FILE
    try:
        with np.load(out / rel, allow_pickle=False) as z:
            arrays = {k: (tuple(z[k].shape), str(z[k].dtype)) for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise EdgeError(f"{rel} is not a readable npz ({type(e).__name__})") from None
    for name in manifest.step.bound_inputs:
        spec = manifest.step.input(name)
        if name not in arrays:
            raise EdgeError(f"{rel} lacks the initial value of {name}")
        if arrays[name] != (tuple(spec.shape), spec.dtype):
            shape, dtype = arrays[name]
            raise EdgeError(f"{rel}: {name} is {dtype}{list(shape)}, the graph wants "
                            f"{spec.dtype}{list(spec.shape)}")
    extra = sorted(set(arrays) - set(manifest.step.bound_inputs))
    if extra:
        raise EdgeError(f"{rel} holds {extra[0]}, which no graph input is bound to")


def _check_infer(manifest: Manifest) -> None:
    if manifest.infer is None:
        return
    io, step = manifest.infer, {t.name: t for t in manifest.step.inputs}
    for t in io.inputs:
        if t.name == "x":
            want = ("N", *_in_shape(manifest))
            if t.shape != want or t.dtype != step["x1"].dtype:
                raise EdgeError(f"{io.file}: x is {t.dtype}{list(t.shape)}, want "
                                f"{step['x1'].dtype}{list(want)}")
        elif t.name not in step or not t.name.startswith(PARAMS):
            raise EdgeError(f"{io.file}: input {t.name} is no parameter of the step")
        elif (t.shape, t.dtype) != (step[t.name].shape, step[t.name].dtype):
            raise EdgeError(f"{io.file}: {t.name} differs from the step's")


def check_bundle(out: str | Path) -> Manifest:
    """Validate a bundle (the module docstring lists what is refused); its manifest."""
    out = Path(out)
    manifest = read_manifest(out)
    _check_hashes(out, manifest)
    records = {io.file: _check_graph(out, io) for io in manifest.graphs()}
    blocks = len(manifest.net.get("blocks") or [])
    _check_interface(manifest.step, None, blocks)
    _check_layers(manifest, blocks)
    plan = None
    if manifest.quant is None:
        _check_fp32(manifest)
    else:
        plan = _check_integer(manifest)
    _check_views(manifest, plan)
    _check_random_bits(manifest)
    _check_chain(manifest)
    _check_records(manifest, records)
    _check_state(out, manifest)
    _check_infer(manifest)
    return manifest


def load_state(out: str | Path) -> dict[str, np.ndarray]:
    manifest = read_manifest(out)
    with np.load(Path(out) / (manifest.state_file or STATE_FILE), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _quant_summary(quant: dict[str, Any] | None) -> str:
    if not quant:
        return "fp32"
    return f"{quant.get('plan', {}).get('quant', '?')} {quant.get('mode', '?')}"


def summary(manifest: Manifest) -> dict[str, Any]:
    bits = (manifest.feeds or {}).get("random_bits") or {}
    return {
        "format": manifest.format, "rule": manifest.rule, "net": manifest.net["name"],
        "batch_size": manifest.batch_size, "quant": _quant_summary(manifest.quant),
        "optimizer": manifest.optimizer.get("name"),
        "target": (manifest.target or {}).get("name"),
        "graphs": [g.file for g in manifest.graphs()], "files": len(manifest.files),
        "bound_inputs": len(manifest.step.bound_inputs),
        "noise_inputs": len(bits.get("inputs", [])),
        "versions": manifest.versions,
    }

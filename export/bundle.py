"""Bundles: everything a device needs to train with nothing but onnxruntime.

    write_bundle(dir, net, rule, program, params, state, batch_size, target=None,
                 per_layer=False) -> Manifest
    check_bundle(dir) -> Manifest       EdgeError on anything missing, corrupted or mismatched

A bundle directory holds
    train_step.onnx               the whole training step
    layers/layer_{i}.onnx         per-layer step graphs (with per_layer=True)
    infer.onnx                    the encoder, weights as inputs named like the step's params:
                                  fp32, or in integer mode the integer network (int8 x in,
                                  uint8 codes out, integer ops only)
    state.npz                     initial values of every bound input (params/*, state/*)
    train_with_onnxruntime.py     standalone trainer: numpy + onnxruntime + the manifest
    manifest.json                 inputs, outputs, bindings, shapes, dtypes, rule, quant,
                                  target, versions, sha256 of every other file
"""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from torch import Tensor

from edge.errors import EdgeError
from edge.nets import NetSpec
from export.inference import encoder_graph, integer_encoder_graph
from export.manifest import PARAMS, STATE, GraphIO, Manifest
from export.step import StepProgram, block_graphs, step_graph
from export.trace import check_model, value_specs

MANIFEST = "manifest.json"
STATE_FILE = "state.npz"
SCRIPT = "train_with_onnxruntime.py"
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
) -> Manifest:
    out = Path(out)
    _check_dir(out)
    model, manifest = step_graph(net, rule, program, params, state, batch_size,
                                 target=_target_dict(target))
    layer_models: list[onnx.ModelProto] = []
    layer_ios: list[GraphIO] = []
    if per_layer:
        layer_models, layer_ios = block_graphs(net, rule, program, params, state, batch_size)
    if manifest.quant is None:
        infer, infer_io = encoder_graph(net, params, outputs="all", weights="inputs")
    else:  # integer mode: its own network, on the integer stores the step trains
        from quant.plan import QuantPlan

        plan = QuantPlan.from_dict(manifest.quant["plan"])
        infer, infer_io = integer_encoder_graph(net, plan, params, outputs="all")
    _prepare_dir(out)
    onnx.save(model, out / manifest.step.file)
    for m, io in zip(layer_models, layer_ios, strict=True):
        (out / io.file).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(m, out / io.file)
    onnx.save(infer, out / infer_io.file)
    write_state(out / STATE_FILE, manifest.step, params, state)
    shutil.copyfile(_SCRIPT_SOURCE, out / SCRIPT)
    files = [manifest.step.file, *(io.file for io in layer_ios), STATE_FILE, SCRIPT]
    files.append(infer_io.file)
    manifest = manifest.with_(
        layers=tuple(layer_ios), infer=infer_io, state_file=STATE_FILE,
        files={f: sha256(out / f) for f in files},
    )
    (out / MANIFEST).write_text(manifest.to_json())
    return manifest


# ------------------------------------------------------------------------------ checking


def read_manifest(out: str | Path) -> Manifest:
    path = Path(out) / MANIFEST
    if not Path(out).is_dir():
        raise EdgeError(f"no bundle directory at {out}")
    if not path.is_file():
        raise EdgeError(f"{out} has no {MANIFEST}; not an edge bundle")
    return Manifest.from_json(path.read_text())


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


def _check_graph(out: Path, io: GraphIO) -> None:
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


def _check_state(out: Path, manifest: Manifest) -> None:
    rel = manifest.state_file or STATE_FILE
    try:
        with np.load(out / rel, allow_pickle=False) as z:
            arrays = {k: (tuple(z[k].shape), str(z[k].dtype)) for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise EdgeError(f"{rel} is not a readable npz ({type(e).__name__}: {e})") from None
    for name in manifest.step.bound_inputs:
        spec = manifest.step.input(name)
        if name not in arrays:
            raise EdgeError(f"{rel} lacks the initial value of {name}")
        if arrays[name] != (tuple(spec.shape), spec.dtype):
            shape, dtype = arrays[name]
            raise EdgeError(f"{rel}: {name} is {dtype}{list(shape)}, the graph wants "
                            f"{spec.dtype}{list(spec.shape)}")


def _check_layers(manifest: Manifest) -> None:
    """Every per-layer tensor is one of the whole step's, with the same shape and dtype."""
    step = {t.name: t for t in (*manifest.step.inputs, *manifest.step.outputs)}
    for io in manifest.layers:
        for out, inp in io.bindings:
            for name in (out, inp):
                if name not in step:
                    raise EdgeError(f"{io.file}: {name} is not a tensor of the whole step")
                spec = next(t for t in (*io.inputs, *io.outputs) if t.name == name)
                if (spec.shape, spec.dtype) != (step[name].shape, step[name].dtype):
                    raise EdgeError(f"{io.file}: {name} differs from the whole step's")


def check_bundle(out: str | Path) -> Manifest:
    """Validate a bundle: files, hashes, graphs against the manifest, the initial state."""
    out = Path(out)
    manifest = read_manifest(out)
    _check_hashes(out, manifest)
    for io in manifest.graphs():
        _check_graph(out, io)
    _check_state(out, manifest)
    _check_layers(manifest)
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
    return {
        "rule": manifest.rule, "net": manifest.net["name"], "batch_size": manifest.batch_size,
        "quant": _quant_summary(manifest.quant), "target": (manifest.target or {}).get("name"),
        "graphs": [g.file for g in manifest.graphs()], "files": len(manifest.files),
        "bound_inputs": len(manifest.step.bound_inputs),
        "versions": manifest.versions,
    }

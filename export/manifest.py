"""The manifest: what a device needs to know to run an exported graph, as plain JSON.

A `GraphIO` names one graph's inputs and outputs (shape, dtype) and its bindings: output ->
input of the *next* step (like ONNX TrainingInfoProto's update_binding), so a runtime trains
by feeding each step's outputs back under the bound input names. A `Manifest` holds the step
graph's `GraphIO`, optionally one per block graph and the inference graph, what produced them
(rule, hyper-parameters, optimizer, network, quantization, target, versions) and, in a
bundle, the definition of every input that is not bound (`feeds`) and the sha256 of every file.

Naming convention of the training graphs (`export.step`):
  inputs   params/<name>, state/<name>, x1, x2 [, noise/<name>]; per block: x instead of
           x1, x2 after block 0
  outputs  new_params/<name>, new_state/<name>, loss, layer_loss; per block: y, loss
  bindings new_params/<name> -> params/<name>, new_state/<name> -> state/<name>: every such
           output feeds the input of the same name, every params/state input is fed by one
           (`binding_problem` says what breaks this)

Format edge-bundle/2 (v1's fields keep their names and meaning; v2 adds `feeds` and
`manifest_sha256`, and `optimizer` is the update the step really runs):
  format, rule, hparams, optimizer, net, batch_size, versions, state_file, files
  quant       null (fp32) or {"mode": "integer", "plan": quant.plan.QuantPlan.to_dict()}
  target      null or the target's description
  noise       null or {"low": 0, "high": 65536} (v1's field, kept; feeds.random_bits says all)
  step, layers, infer     GraphIO of train_step.onnx, layers/layer_{i}.onnx, infer.onnx
  feeds       {"views", "random_bits", "chain"}: every input that is not bound (below)
  manifest_sha256         sha256 of the manifest file's bytes with the 64 hex digits of this
                          value replaced by 64 "0" characters (`manifest_digest`); the last
                          field. `Manifest.to_json` writes it, `Manifest.from_json` verifies
                          it; with `files` it covers every file of a bundle.
Every field is required (null where allowed); the format is checked first, then every
field by name and type (`from_dict`: "manifest lacks the field 'step.inputs[3].dtype'").

feeds.views: x1, x2 ({inputs, dtype, shape, pairing, normalisation, quantization}):
  normalisation   {formula: (pixel / 255 - mean[c]) / std[c], mean, std} per channel, or
                  null where the exporter was not given the data's statistics
  quantization    integer bundles: q = clip(round_half_even(x * 2^f_in), -128, 127) as int8
                  ({source, formula, scale_exponent: f_in, rounding: half_to_even,
                  clip: [-128, 127], dtype: int8}); fp32 bundles: null
feeds.random_bits (null without noise/* inputs): {inputs (every noise/* input of every
  graph, sorted; noise/err.* included), dtype int32, distribution "uniform integers", low 0,
  high 65536 (exclusive), fresh: true (drawn anew every step, never reused), purpose (input ->
  what it rounds), per_block, reference}. A device may use any uniform source; `reference`
  is the generator `export.runner.draw_noise` (OnnxStepper) and the bundle script both use:
  one numpy default_rng(seed) for the whole run, each step drawing
  rng.integers(0, 65536, size=shape, dtype=int32) for every name of `inputs` in order.
feeds.chain (null without per-block graphs): {input x, output y, blocks, streams, rule,
  order}: block 0 takes x1, x2, block i > 0 block i-1's y (streams x batch_size rows) as x.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from edge.errors import EdgeError

FORMAT = "edge-bundle/2"
PARAMS, STATE = "params/", "state/"
NEW_PARAMS, NEW_STATE = "new_params/", "new_state/"
NOISE = "noise/"
DTYPES = ("float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
VIEWS = ("x1", "x2")
NOISE_LOW, NOISE_HIGH, NOISE_DTYPE = 0, 1 << 16, "int32"
DIGEST_KEY = "manifest_sha256"
_ZEROS = "0" * 64
_DIGEST = re.compile(r'"manifest_sha256"\s*:\s*"([0-9a-f]{64})"')
X_CLIP = (-128, 127)
REFERENCE = {
    "generator": "numpy.random.default_rng(seed), created once for the whole run",
    "draw": "rng.integers(0, 65536, size=shape, dtype=numpy.int32)",
    "order": "every step, one draw per name of 'inputs' in that (sorted) order, shapes from "
             "the graph inputs; the whole step and the per-block chain draw the same bits",
    "used_by": ["export.runner.draw_noise (OnnxStepper)", "train_with_onnxruntime.py"],
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # a str is a symbolic (dynamic) dimension
    dtype: str  # numpy dtype name, one of DTYPES

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        if self.dtype not in DTYPES:
            raise EdgeError(f"tensor {self.name!r}: unsupported dtype {self.dtype!r}")

    @staticmethod
    def from_dict(d: dict[str, Any], where: str = "tensor") -> TensorSpec:
        shape = require(d, "shape", where, list)
        if not all(isinstance(s, (int, str)) and not isinstance(s, bool) for s in shape):
            raise EdgeError(f"manifest field {where}.shape holds a non-integer dimension")
        return TensorSpec(require(d, "name", where, str), tuple(shape),
                          require(d, "dtype", where, str))


@dataclass(frozen=True)
class GraphIO:
    """One graph file: its inputs, outputs and output -> next-step-input bindings."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    bindings: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for attr in ("inputs", "outputs", "bindings"):
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        ins = {t.name: t for t in self.inputs}
        outs = {t.name: t for t in self.outputs}
        for out, inp in self.bindings:
            if out not in outs or inp not in ins:
                raise EdgeError(f"{self.file}: binding {out} -> {inp} names an unknown tensor")
            if (outs[out].shape, outs[out].dtype) != (ins[inp].shape, ins[inp].dtype):
                raise EdgeError(f"{self.file}: binding {out} -> {inp} changes shape or dtype")

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise EdgeError(f"{self.file} has no input {name!r}")

    @property
    def bound_inputs(self) -> tuple[str, ...]:
        """Inputs carried from step to step (parameters and optimizer state)."""
        return tuple(inp for _, inp in self.bindings)

    def memory_view(self) -> dict[str, Any]:
        """What the memory simulator reads: bindings, parameter and optimizer-state names."""
        bound = dict(self.bindings)
        return {
            "bindings": bound,
            "param_names": [i for i in bound.values() if i.startswith("params/")],
            "state_names": [i for i in bound.values() if not i.startswith("params/")],
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "inputs": [asdict(t) for t in self.inputs],
            "outputs": [asdict(t) for t in self.outputs],
            "bindings": [{"output": o, "input": i} for o, i in self.bindings],
        }

    @staticmethod
    def from_dict(d: dict[str, Any], where: str = "graph") -> GraphIO:
        file = require(d, "file", where, str)

        def specs(key: str) -> tuple[TensorSpec, ...]:
            items = require(d, key, where, list)
            return tuple(TensorSpec.from_dict(_item(t, f"{where}.{key}[{j}]"),
                                              f"{where}.{key}[{j}]") for j, t in enumerate(items))

        def pair(j: int, b: Any) -> tuple[str, str]:
            at = f"{where}.bindings[{j}]"
            return require(_item(b, at), "output", at, str), require(b, "input", at, str)

        inputs, outputs = specs("inputs"), specs("outputs")
        bindings = tuple(pair(j, b) for j, b in enumerate(require(d, "bindings", where, list)))
        return GraphIO(file, inputs, outputs, bindings)


def binding_problem(io: GraphIO, shared: tuple[str, ...] = ()) -> str | None:
    """What breaks the binding convention of a training graph, or None: every new_params/*
    and new_state/* output bound once, to the input of the same name; every params/* and
    state/* input fed by exactly one binding, except `shared` ones another graph of a chain
    feeds (state/step before the last block); nothing else bound."""
    ins, outs = {t.name for t in io.inputs}, {t.name for t in io.outputs}
    seen_out: set[str] = set()
    seen_in: set[str] = set()
    for out, inp in io.bindings:
        if out in seen_out:
            return f"output {out} is bound twice"
        if inp in seen_in:
            return f"input {inp} is bound twice"
        seen_out.add(out)
        seen_in.add(inp)
        if not out.startswith((NEW_PARAMS, NEW_STATE)):
            return f"binding {out} -> {inp} carries an output that is no new_params/new_state"
        if inp != out[len("new_"):]:
            return f"binding {out} -> {inp}: an output must feed the input of its own name"
    for name in sorted(outs - seen_out):
        if name.startswith((NEW_PARAMS, NEW_STATE)):
            return f"output {name} is bound to no input (its update would be lost)"
    for name in sorted(ins - seen_in - set(shared)):
        if name.startswith((PARAMS, STATE)):
            return f"input {name} is fed by no binding (it would never change)"
    return None


@dataclass(frozen=True)
class Manifest:
    step: GraphIO
    rule: str
    hparams: dict[str, Any]
    optimizer: dict[str, Any]  # the update the step really runs
    net: dict[str, Any]
    batch_size: int
    versions: dict[str, str]
    quant: dict[str, Any] | None = None  # None: fp32
    target: dict[str, Any] | None = None
    noise: dict[str, Any] | None = None  # {"low", "high"} (v1); feeds["random_bits"] in full
    layers: tuple[GraphIO, ...] = ()  # per-block graphs: block 0 x1, x2; then x; out y
    infer: GraphIO | None = None
    state_file: str | None = None  # npz of the initial bound inputs
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    feeds: dict[str, Any] | None = None  # every input that is not bound (module docstring)
    format: str = FORMAT

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        for attr in ("hparams", "optimizer", "net", "versions", "quant", "target", "noise",
                     "feeds"):
            object.__setattr__(self, attr, _plain(getattr(self, attr)))  # tuples -> lists
        if self.format != FORMAT:
            raise EdgeError(f"manifest format {self.format!r} is not {FORMAT!r}; re-export "
                            "the bundle with this edge")

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.step.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.step.outputs

    @property
    def bindings(self) -> tuple[tuple[str, str], ...]:
        return self.step.bindings

    def graphs(self) -> tuple[GraphIO, ...]:
        return (self.step, *self.layers, *((self.infer,) if self.infer else ()))

    def with_(self, **changes: Any) -> Manifest:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "rule": self.rule,
            "hparams": self.hparams,
            "optimizer": self.optimizer,
            "net": self.net,
            "batch_size": self.batch_size,
            "quant": self.quant,
            "target": self.target,
            "noise": self.noise,
            "feeds": self.feeds,
            "versions": self.versions,
            "state_file": self.state_file,
            "step": self.step.to_dict(),
            "layers": [g.to_dict() for g in self.layers],
            "infer": self.infer.to_dict() if self.infer else None,
            "files": self.files,
        }

    def to_json(self) -> str:
        """The manifest file's text, `manifest_sha256` (its own digest) last."""
        d = self.to_dict()
        if _DIGEST.search(json.dumps(d)):
            raise EdgeError(f"a manifest value may not hold the key {DIGEST_KEY!r}")
        d[DIGEST_KEY] = _ZEROS
        text = json.dumps(d, indent=2)
        return text.replace(f'"{DIGEST_KEY}": "{_ZEROS}"',
                            f'"{DIGEST_KEY}": "{manifest_digest(text)}"')

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Manifest:
        """Every field checked by name and type; the format first (an older one is named)."""
        if not isinstance(d, dict):
            raise EdgeError("manifest is not a JSON object")
        fmt = require(d, "format", "", str)
        if fmt != FORMAT:
            raise EdgeError(f"manifest format {fmt!r} is not {FORMAT!r}; re-export the bundle "
                            "with this edge")
        get = {k: require(d, k, "", kind) for k, kind in _FIELDS.items()}
        if get["batch_size"] < 1:
            raise EdgeError(f"manifest field 'batch_size' must be positive, got "
                            f"{get['batch_size']}")
        _strings(get["files"], "files")
        return Manifest(
            step=GraphIO.from_dict(get["step"], "step"),
            rule=get["rule"],
            hparams=get["hparams"],
            optimizer=get["optimizer"],
            net=get["net"],
            batch_size=get["batch_size"],
            versions=get["versions"],
            quant=get["quant"],
            target=get["target"],
            noise=get["noise"],
            layers=tuple(GraphIO.from_dict(_item(g, f"layers[{i}]"), f"layers[{i}]")
                         for i, g in enumerate(get["layers"])),
            infer=GraphIO.from_dict(get["infer"], "infer") if get["infer"] else None,
            state_file=get["state_file"],
            files=dict(get["files"]),
            feeds=get["feeds"],
            format=fmt,
        )

    @staticmethod
    def from_json(text: str) -> Manifest:
        """Parse, check every field, then the manifest's own digest (`manifest_digest`)."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise EdgeError(f"manifest is not valid JSON ({e})") from None
        manifest = Manifest.from_dict(d)
        require(d, DIGEST_KEY, "", str)
        found = _DIGEST.findall(text)
        if len(found) != 1:
            raise EdgeError(f"manifest field {DIGEST_KEY!r} must be 64 lowercase hex digits, "
                            "once")
        if found[0] != manifest_digest(text):
            raise EdgeError(f"manifest.json does not match its {DIGEST_KEY} (edited after "
                            "export; re-export, do not edit)")
        return manifest


def manifest_digest(text: str) -> str:
    """sha256 of the manifest text (UTF-8) with the 64 hex digits of its manifest_sha256
    replaced by 64 "0" characters, every other byte as it is."""
    m = _DIGEST.search(text)
    if m is None:
        raise EdgeError(f"manifest has no {DIGEST_KEY} of 64 lowercase hex digits")
    return hashlib.sha256((text[: m.start(1)] + _ZEROS + text[m.end(1):]).encode()).hexdigest()


# ------------------------------------------------------------------------------ feeds


def views_feed(x: TensorSpec, normalisation: dict[str, Any] | None,
               f_in: int | None) -> dict[str, Any]:
    """feeds.views: x1, x2 as the graphs take them, and how a float image becomes one."""
    quant = None
    if f_in is not None:
        quant = {"source": "the normalised float32 view", "dtype": "int8",
                 "formula": "clip(round_half_even(x * 2^scale_exponent), -128, 127)",
                 "scale_exponent": f_in, "rounding": "half_to_even", "clip": list(X_CLIP)}
    return {"inputs": list(VIEWS), "dtype": x.dtype, "shape": list(x.shape),
            "pairing": "row i of x1 and row i of x2 are two augmented views of the same image; "
                       "new images every step",
            "normalisation": normalisation, "quantization": quant}


def normalisation_feed(mean: Any, std: Any) -> dict[str, Any]:
    return {"formula": "(pixel / 255 - mean[c]) / std[c], pixel in [0, 255], c the channel",
            "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def noise_purpose(name: str, params: set[str]) -> str:
    """What one noise/* input rounds (`quant.integer`: noise_key, noise_shapes)."""
    key = name[len(NOISE):]
    if key in params:
        return f"stochastic rounding of the update of params/{key}"
    parts = key.split(".")
    if parts[0] == "err" and parts[-1] == "z":
        return f"stochastic rounding of block {parts[1]}'s int8 rule error"
    if parts[0] == "err" and parts[-1] == "gx":
        return f"stochastic rounding of the int8 input-gradient at enc.{'.'.join(parts[1:-1])}"
    return "stochastic rounding inside the step"


def random_bits_feed(names: list[str], params: list[str]) -> dict[str, Any] | None:
    """feeds.random_bits of these noise/* inputs (None if there are none); `params` the
    step's parameter names (without params/)."""
    if not names:
        return None
    return {
        "inputs": sorted(names), "dtype": NOISE_DTYPE, "distribution": "uniform integers",
        "low": NOISE_LOW, "high": NOISE_HIGH, "fresh": True,
        "freshness": "drawn anew for every step, independent of every earlier draw; never "
                     "reuse a step's bits",
        "purpose": {n: noise_purpose(n, set(params)) for n in sorted(names)},
        "per_block": "each per-block graph takes the subset its inputs list; draw every "
                     "input once per step and give each graph its own",
        "reference": REFERENCE,
    }


def chain_feed(blocks: int, streams: int) -> dict[str, Any] | None:
    """feeds.chain of `blocks` per-block graphs (None if there are none); y holds `streams`
    x batch rows."""
    if not blocks:
        return None
    return {"input": "x", "output": "y", "blocks": blocks, "streams": streams,
            "rule": "graph 0 takes x1, x2; graph i > 0 takes graph i-1's y as x: the rule's "
                    "streams stacked along the batch axis (streams x batch_size rows; view 1 "
                    "rows first, then view 2)",
            "order": "run graphs 0..n-1 within one step on the bound values of the step's "
                     "start; apply every graph's bindings after the last"}


# ------------------------------------------------------------------------------ fields

_FIELDS: dict[str, type | tuple[type, ...]] = {
    "rule": str, "hparams": dict, "optimizer": dict, "net": dict, "batch_size": int,
    "versions": dict, "quant": (dict, type(None)), "target": (dict, type(None)),
    "noise": (dict, type(None)), "feeds": (dict, type(None)), "state_file": (str, type(None)),
    "step": dict, "layers": list, "infer": (dict, type(None)), "files": dict,
}
_NAMES = {str: "a string", dict: "an object", list: "a list", int: "an integer",
          type(None): "null"}


def require(d: Any, key: str, where: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """d[key], or a one-line EdgeError naming the missing or mistyped field `where.key`."""
    path = f"{where}.{key}" if where else key
    if not isinstance(d, dict):
        raise EdgeError(f"manifest field {where or 'top level'!r} is not an object")
    if key not in d:
        raise EdgeError(f"manifest lacks the field {path!r}")
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,) if kind else ()
    if kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
        want = " or ".join(_NAMES.get(k, k.__name__) for k in kinds)
        raise EdgeError(f"manifest field {path!r} must be {want}, got {type(value).__name__}")
    return value


def _item(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EdgeError(f"manifest field {where!r} must be an object")
    return value


def _strings(d: dict[str, Any], where: str) -> None:
    for k, v in d.items():
        if not isinstance(v, str):
            raise EdgeError(f"manifest field {where}.{k!r} must be a string")


def feed(manifest: Manifest, *path: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """manifest.feeds[path...], naming the missing field (`feeds.views.dtype`)."""
    value: Any = {"feeds": manifest.feeds}
    keys = ("feeds", *path)
    for j, key in enumerate(keys):
        value = require(value, key, ".".join(keys[:j]), kind if j == len(keys) - 1 else None)
    return value


def _plain(obj: Any) -> Any:
    """The value as JSON gives it back, so a manifest equals its own round trip."""
    return json.loads(json.dumps(obj))

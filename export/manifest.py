"""The manifest: what a device needs to know to run an exported graph, as plain JSON.

A `GraphIO` names one graph's inputs and outputs (shape, dtype) and its bindings: output ->
input of the *next* step (like ONNX TrainingInfoProto's update_binding), so a runtime trains
by feeding each step's outputs back under the bound input names. A `Manifest` holds the step
graph's `GraphIO`, optionally one per layer graph and the inference graph, and what produced
them (rule, hyper-parameters, optimizer, network, quantization, target, versions). In a
bundle it also lists the sha256 of every file.

Naming convention of the training graphs (`export.training_step`):
  inputs   params/<name>, state/<name>, x1, x2 [, noise/<name>: random bits, stochastic rounding]
  outputs  new_params/<name>, new_state/<name>, loss, layer_loss
  bindings new_params/<name> -> params/<name>, new_state/<name> -> state/<name>
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from edge.errors import EdgeError

FORMAT = "edge-bundle/1"
PARAMS, STATE = "params/", "state/"
NEW_PARAMS, NEW_STATE = "new_params/", "new_state/"
NOISE = "noise/"
DTYPES = ("float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")


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
    def from_dict(d: dict[str, Any]) -> TensorSpec:
        return TensorSpec(d["name"], tuple(d["shape"]), d["dtype"])


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
    def from_dict(d: dict[str, Any]) -> GraphIO:
        return GraphIO(
            d["file"],
            tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            tuple((b["output"], b["input"]) for b in d["bindings"]),
        )


@dataclass(frozen=True)
class Manifest:
    step: GraphIO
    rule: str
    hparams: dict[str, Any]
    optimizer: dict[str, Any]
    net: dict[str, Any]
    batch_size: int
    versions: dict[str, str]
    quant: dict[str, Any] | None = None  # None: fp32
    target: dict[str, Any] | None = None
    noise: dict[str, Any] | None = None  # {"low", "high"}: uniform integers for noise/* inputs
    layers: tuple[GraphIO, ...] = ()  # per-layer graphs: x1, x2 in; y1, y2 out to the next
    infer: GraphIO | None = None
    state_file: str | None = None  # npz of the initial bound inputs
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    format: str = FORMAT

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        for attr in ("hparams", "optimizer", "net", "versions", "quant", "target", "noise"):
            object.__setattr__(self, attr, _plain(getattr(self, attr)))  # tuples -> lists
        if self.format != FORMAT:
            raise EdgeError(f"manifest format {self.format!r} is not {FORMAT!r}")

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
            "versions": self.versions,
            "state_file": self.state_file,
            "step": self.step.to_dict(),
            "layers": [g.to_dict() for g in self.layers],
            "infer": self.infer.to_dict() if self.infer else None,
            "files": self.files,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Manifest:
        try:
            return Manifest(
                step=GraphIO.from_dict(d["step"]),
                rule=d["rule"],
                hparams=d["hparams"],
                optimizer=d["optimizer"],
                net=d["net"],
                batch_size=int(d["batch_size"]),
                versions=d["versions"],
                quant=d.get("quant"),
                target=d.get("target"),
                noise=d.get("noise"),
                layers=tuple(GraphIO.from_dict(g) for g in d.get("layers", [])),
                infer=GraphIO.from_dict(d["infer"]) if d.get("infer") else None,
                state_file=d.get("state_file"),
                files=dict(d.get("files", {})),
                format=d.get("format", "?"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise EdgeError(f"malformed manifest ({type(e).__name__}: {e})") from None

    @staticmethod
    def from_json(text: str) -> Manifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise EdgeError(f"manifest is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise EdgeError("manifest is not a JSON object")
        return Manifest.from_dict(d)


def _plain(obj: Any) -> Any:
    """The value as JSON gives it back, so a manifest equals its own round trip."""
    return json.loads(json.dumps(obj))

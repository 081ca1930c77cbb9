"""ONNX graph -> `Schedule`: sizes from shape inference, order from the node list.

Steps:

1. Load (a ModelProto, bytes or a path; external weight data is not read: only dims matter) and
   run the ONNX checker, so a corrupt file becomes one `EdgeError` line.
2. Resolve dynamic dims before inference: a `dim_param` named in `dims` takes that value; a
   bare `batch_size` fills the batch-like dims (`batch*`, `N`, `bs`, `unk__*`, unnamed) of the
   first data input and any `*batch*` dim of the other inputs. Then
   `onnx.shape_inference.infer_shapes(strict_mode=True, data_prop=True)`; if strict inference
   fails we retry non-strict and keep a note. Shapes inference cannot derive (run-time shape
   arithmetic such as Shape -> Range) are measured by one onnxruntime run on zeros
   (`measure`, see `edge.sim.measure`). A tensor still unsized -> an `EdgeError` naming the
   tensor and the `dims` entry that would fix it. Sizes themselves: `export.onnx_sizes`.
3. Execution order is the node order (ONNX requires it to be topological; we check it).
4. Categories: initializers are parameters (optimizer state when listed in `state_names`); graph
   inputs are parameters / optimizer state when listed in the manifest (`param_names`,
   `state_names`, or as a binding target), otherwise - only when no manifest is given - when
   their names look like it (`weight`, `bias`, `W1`, `exp_avg`, `momentum` ...); the rest are
   inputs. Node outputs bound by `bindings` (new-parameter output -> parameter input) are update
   buffers, other graph outputs are outputs, everything else is an activation.
5. If / Loop / Scan bodies are counted conservatively: the node reads every outer value its body
   uses, and a scratch tensor the size of everything the body writes lives during that step.
6. Views (on by default, `alias_views=False` turns it off): the output of a `VIEW_OPS` node
   that is not a graph output owns no bytes; it *is* its input 0 (through chains of views, the
   first non-view tensor: the base). A reader of a view reads the base, so the base stays live
   until the last reader of the base or of any view of it. Views of graph inputs and
   parameters alias too (onnxruntime shares those buffers as well); a view that is a graph
   output gets its own buffer, since onnxruntime allocates every graph output separately.

   `VIEW_OPS` are the ONNX-domain ops whose onnxruntime CPU kernels are registered with
   `KernelDefBuilder().Alias(0, 0)`: Reshape, Flatten, Squeeze, Unsqueeze and Identity
   (reshape.cc, flatten.cc, squeeze.cc, unsqueeze.cc, identity_op.cc). For those, the
   allocation planner (allocation_planner.cc, `FindReusableInput`) *must* reuse input 0's
   buffer for output 0 - unless the output is a graph output (`kAllocateOutput`) - and adds
   the output's uses to the input buffer's use count. Not views here: Dropout (its kernels
   since opset 10 declare no alias), ops that merely *may* run in place (`MayInplace`:
   elementwise Relu, Add, ...; the planner reuses the input only if it dies there), and
   Transpose / Slice / Expand, which compute a new layout (strided views exist only in
   onnxruntime training builds).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

import onnx
from onnx import GraphProto, ModelProto, TypeProto

from edge.errors import EdgeError
from edge.sim.measure import measure_shapes
from edge.sim.schedule import Op, Schedule, TensorInfo
from export.onnx_sizes import BATCH_FIRST_RE, Sizer, body_cost, graph_types, subgraphs

_STATE_RE = re.compile(r"(momentum|velocity|exp_avg|moment|adam|optim|(^|[._/])(m|v)\d*$)", re.I)
_PARAM_RE = re.compile(r"(weight|bias|kernel|gamma|beta|running_|param|(^|[._/])(w|b)\d*$)", re.I)
_BATCH_ANY_RE = re.compile(r"batch", re.I)
# Ops whose output is a view of input 0 (module docstring, rule 6: onnxruntime's Alias(0, 0)).
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


def _one_line(text: object, limit: int = 240) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass(frozen=True)
class GraphOptions:
    """How to read a graph: dim values, the exporter's manifest (names and bindings), whether
    view ops alias their input (`alias_views`, rule 6) and whether to measure unknown shapes."""

    dims: Mapping[str, int] = field(default_factory=dict)
    batch_size: int | None = None
    param_names: frozenset[str] = frozenset()
    state_names: frozenset[str] = frozenset()
    bindings: Mapping[str, str] = field(default_factory=dict)
    alias_views: bool = True  # VIEW_OPS outputs share their input's bytes
    measure: bool = True  # run onnxruntime on zeros for shapes inference cannot derive

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", MappingProxyType(dict(self.dims)))
        object.__setattr__(self, "bindings", MappingProxyType(dict(self.bindings)))
        object.__setattr__(self, "param_names", frozenset(self.param_names))
        object.__setattr__(self, "state_names", frozenset(self.state_names))
        for k, v in self.dims.items():
            if not isinstance(v, int) or v < 1:
                raise EdgeError(f"dim {k!r} must be a positive integer, got {v!r}")
        if self.batch_size is not None and (
            not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise EdgeError(f"batch size must be a positive integer, got {self.batch_size!r}")

    @property
    def has_manifest(self) -> bool:
        return bool(self.param_names or self.state_names or self.bindings)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, object] | None, **kw: object) -> GraphOptions:
        """Read `{"bindings": {out: in}, "param_names": [...], "state_names": [...]}`.

        Other keys are ignored, so an exporter's manifest can carry more than this reads.
        """
        m = dict(manifest or {})
        bindings = m.get("bindings") or {}
        if not isinstance(bindings, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in bindings.items()
        ):
            raise EdgeError("manifest 'bindings' must map new-parameter output -> parameter input")
        names = {}
        for key in ("param_names", "state_names"):
            value = m.get(key) or []
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise EdgeError(f"manifest {key!r} must be a list of tensor names")
            names[key] = frozenset(value)
        return cls(bindings=dict(bindings), **names, **kw)  # type: ignore[arg-type]


def load_model(model: ModelProto | str | Path | bytes) -> ModelProto:
    """Load and check a model; any failure is a one-line EdgeError."""
    where = "model"
    try:
        if isinstance(model, ModelProto):
            proto = model
        elif isinstance(model, bytes):
            proto = onnx.load_from_string(model)
        else:
            where = str(model)
            if not Path(model).is_file():
                raise EdgeError(f"ONNX model not found: {model}")
            proto = onnx.load(str(model), load_external_data=False)
        if not proto.graph.node and not proto.graph.output:
            raise EdgeError(f"{where} is not an ONNX model (no nodes, no outputs)")
        onnx.checker.check_model(proto)
    except EdgeError:
        raise
    except Exception as exc:  # protobuf DecodeError, ValidationError, OSError ...
        raise EdgeError(f"cannot read ONNX {where}: {_one_line(exc)}") from None
    return proto


def input_category(name: str, opts: GraphOptions, initializer: bool = False) -> str:
    """Category of a graph input or initializer (rule 4 of the module docstring)."""
    if name in opts.state_names:
        return "optimizer_state"
    if initializer or name in opts.param_names or name in opts.bindings.values():
        return "parameter"
    if not opts.has_manifest and _STATE_RE.search(name):
        return "optimizer_state"
    if not opts.has_manifest and _PARAM_RE.search(name):
        return "parameter"
    return "input"


def _resolve_inputs(model: ModelProto, opts: GraphOptions, inits: set[str]) -> dict[str, int]:
    """Write concrete dims into the graph inputs; return every dim name -> value used."""
    resolved = dict(opts.dims)
    data_inputs = [
        i
        for i in model.graph.input
        if i.name not in inits and input_category(i.name, opts) == "input"
    ]
    filled = False
    for idx, vi in enumerate(data_inputs):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                continue
            p = d.dim_param
            if p in resolved:
                d.dim_value = resolved[p]
            elif opts.batch_size is not None and (
                (idx == 0 and (not p or BATCH_FIRST_RE.match(p)))
                or bool(p and _BATCH_ANY_RE.search(p))
            ):
                if p:
                    resolved[p] = opts.batch_size
                d.dim_value = opts.batch_size
                filled = True
    if opts.batch_size is not None and not filled and data_inputs:
        first = data_inputs[0]
        dims = [
            d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
            for d in first.type.tensor_type.shape.dim
        ]
        if not dims or dims[0] != opts.batch_size:
            raise EdgeError(
                f"batch size {opts.batch_size}: input {first.name!r} has no dynamic "
                f"batch dim (shape {dims}); export it with a dynamic axis or drop it"
            )
    for vi in list(model.graph.output) + list(model.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in resolved:
                d.dim_value = resolved[d.dim_param]
    return resolved


def _infer(model: ModelProto, notes: list[str]) -> ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:
        notes.append(f"strict shape inference failed ({_one_line(exc, 120)}); used non-strict")
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise EdgeError(f"ONNX shape inference failed: {_one_line(exc)}") from None


def _size_node_outputs(
    g: GraphProto,
    types: Mapping[str, TypeProto],
    size,
    readers: set[str],
    model: ModelProto | None,
    notes: list[str],
) -> dict[str, TensorInfo | None]:
    """Size every node output; measure the ones inference left unknown (see `measure`)."""
    sized: dict[str, TensorInfo | None] = {}
    failed: dict[str, EdgeError] = {}
    for step, node in enumerate(g.node):
        for name in (o for o in node.output if o):
            try:
                sized[name] = size(
                    name,
                    types.get(name),
                    f"output of {node.op_type} {repr(node.name) if node.name else f'#{step}'}",
                )
            except EdgeError as exc:
                sized[name], failed[name] = None, exc
    missing = [n for n, info in sized.items() if info is None]
    if not missing:
        return sized
    why = ""
    if model is not None:
        try:
            measured = measure_shapes(model, missing)
            sized.update(measured)
            notes.append(
                f"{len(measured)} tensor shapes that shape inference could not derive "
                "were measured by running onnxruntime on all-zero inputs"
            )
        except Exception as exc:
            why = f" (measuring it with onnxruntime failed: {_one_line(exc, 120)})"
    for name in missing:
        if sized[name] is None and name in readers:
            err = failed.get(name) or EdgeError(
                f"ONNX shape inference could not find the shape of {name!r}; export with "
                "static shapes"
            )
            raise EdgeError(f"{err}{why}") from None
    return sized


def _is_view(node: onnx.NodeProto, opts: GraphOptions, graph_outputs: set[str]) -> bool:
    """Rule 6: an ONNX-domain VIEW_OPS node whose output 0 is not a graph output."""
    return (
        opts.alias_views
        and node.domain in ("", "ai.onnx")
        and node.op_type in VIEW_OPS
        and bool(node.input)
        and bool(node.input[0])
        and bool(node.output)
        and bool(node.output[0])
        and node.output[0] not in graph_outputs
    )


def schedule_from_onnx(
    model: ModelProto | str | Path | bytes, options: GraphOptions | None = None
) -> Schedule:
    """Lower an ONNX model to a `Schedule` (see the module docstring for every rule)."""
    opts = options or GraphOptions()
    model_copy = ModelProto()
    model_copy.CopyFrom(load_model(model))
    g = model_copy.graph
    inits = {t.name for t in g.initializer}
    resolved = _resolve_inputs(model_copy, opts, inits)
    notes: list[str] = []
    g = _infer(model_copy, notes).graph
    types = graph_types(g)
    sizer = Sizer(resolved)

    def size(name: str, tp: TypeProto | None, writer: str) -> TensorInfo | None:
        s = sizer(name, tp, writer)
        return None if s is None else TensorInfo(s.name, s.nbytes, "activation", s.shape, s.dtype)

    input_names = [i.name for i in g.input if i.name not in inits]
    output_names = [o.name for o in g.output]
    known = set(input_names) | inits
    for n in opts.param_names | opts.state_names:
        if n not in known:
            raise EdgeError(f"manifest names {n!r}, which is not a graph input or initializer")
    for new, old in opts.bindings.items():
        if new not in output_names:
            raise EdgeError(f"manifest binding {new!r} -> {old!r}: {new!r} is not a graph output")
        if old not in known:
            raise EdgeError(f"manifest binding {new!r} -> {old!r}: {old!r} is not a graph input")

    tensors: dict[str, TensorInfo] = {}
    for name in sorted(inits) + input_names:
        if name in tensors:
            continue
        info = size(name, types.get(name), "graph input")
        if info is None:
            raise EdgeError(f"graph input {name!r} has no tensor shape; pass static shapes")
        tensors[name] = replace(info, category=input_category(name, opts, name in inits))

    ops: list[Op] = []
    view_of: dict[str, str] = {}  # view output -> its base tensor
    produced_later = {o for node in g.node for o in node.output if o}
    defined = set(tensors)
    unsized: list[str] = []
    outputs_set = set(output_names)
    views = {node.output[0] for node in g.node if _is_view(node, opts, outputs_set)}
    readers = ({i for node in g.node for i in node.input} | outputs_set) - views
    sized = _size_node_outputs(g, types, size, readers, model_copy if opts.measure else None, notes)
    for step, node in enumerate(g.node):
        op_type = node.op_type
        if node.domain not in ("", "ai.onnx"):
            op_type = f"{node.domain}.{node.op_type}"
        op_name = node.name or f"{node.op_type}_{step}"
        ins: list[str] = []
        refs = [i for i in node.input if i]
        scratch = 0
        for sub in subgraphs(node):
            cost, outer = body_cost(sub, sizer)
            scratch += cost
            refs += sorted(outer & (defined | produced_later))
        for name in refs:
            if name not in defined:
                where = (
                    "a later node" if name in produced_later else "no node, input or initializer"
                )
                raise EdgeError(
                    f"node {op_name!r} reads {name!r}, which {where} defines; ONNX "
                    "graphs must list nodes in topological order"
                )
            base = view_of.get(name, name)
            if base not in ins:
                ins.append(base)
        outs: list[str] = []
        for name in node.output:
            if not name:
                continue
            if name in defined:
                raise EdgeError(f"tensor {name!r} is written twice (node {op_name!r})")
            defined.add(name)
            if name in views:
                view_of[name] = view_of.get(node.input[0], node.input[0])
                continue
            info = sized.get(name)
            if info is None:
                unsized.append(name)
                continue
            cat = (
                "update_buffer"
                if name in opts.bindings
                else "output"
                if name in output_names
                else "activation"
            )
            tensors[name] = replace(info, category=cat)
            outs.append(name)
        if scratch:
            tmp = f"{op_name}/body_scratch"
            tensors[tmp] = TensorInfo(tmp, scratch, "activation", (scratch,), "uint8")
            outs.append(tmp)
            notes.append(f"{op_type} {op_name!r}: body counted as {scratch} bytes of scratch")
        ops.append(Op(op_name, op_type, tuple(ins), tuple(outs)))
    if unsized:
        notes.append(f"{len(unsized)} unread outputs of unknown shape not counted: {unsized[:3]}")
    if model_copy.functions:
        notes.append("model-local functions are sized by their outputs only")
    if view_of:
        notes.append(
            f"{len(view_of)} outputs of {'/'.join(sorted(VIEW_OPS))} alias their "
            "inputs (no bytes of their own; the base lives until the views' last reader)"
        )
    outputs = tuple(dict.fromkeys(view_of.get(o, o) for o in output_names))
    return Schedule(
        tuple(ops), tensors, dict(opts.bindings), outputs, name=g.name or "onnx", notes=tuple(notes)
    )

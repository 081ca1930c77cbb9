"""Sizes of ONNX values: element bits, shapes with named dims, and If/Loop/Scan bodies.

The one memory model of an ONNX value, shared by the exporter's memory-aware node order
(`export.reorder`) and the simulator (`edge.sim`), which sits above the exporter: a tensor of
n elements of b bits takes ceil(n b / 8) bytes (`elem_bits`, `nbytes_of`; sub-byte types pack).

`Sizer` turns a value's TypeProto into a `Sized` (name, bytes, shape, dtype), resolving
symbolic dims from the options (and failing with the option that would fix it). `body_cost`
sizes a control-flow body conservatively: the sum of every tensor it writes (recursively), plus
the names of the outer-scope values it reads, which must stay live until the node runs.
`static_nbytes` and `tensor_bytes` are the lenient form the exporter uses: a value without a
static shape or a sized element type is left out instead of failing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import onnx
from onnx import AttributeProto, GraphProto, TypeProto

from edge.errors import EdgeError


class Sized(NamedTuple):
    name: str
    nbytes: int
    shape: tuple[int, ...]
    dtype: str


BATCH_FIRST_RE = re.compile(r"^(n|b|bs|batch.*|.*_batch(_size)?|unk__\d+)$", re.I)


def elem_bits(elem_type: int, tensor: str) -> tuple[str, int]:
    """(dtype name, bits per element); sub-byte types pack, so int4 is 4 bits."""
    name = onnx.TensorProto.DataType.Name(elem_type) if elem_type else "UNDEFINED"
    if name in ("UNDEFINED", "STRING"):
        raise EdgeError(f"tensor {tensor!r} has element type {name}; cannot size it")
    for prefix, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4", 4), ("INT2", 2), ("UINT2", 2)):
        if name.startswith(prefix):
            return name.lower(), bits
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    return np_dtype.name, 8 * np_dtype.itemsize


def nbytes_of(shape: Iterable[int], bits: int) -> int:
    return -(-math.prod(shape) * bits // 8)


def static_nbytes(elem_type: int, dims: Iterable[object]) -> int | None:
    """Bytes of a tensor of ONNX element type `elem_type` and shape `dims`; None when a dim is
    not a plain non-negative int or the element type has no size (undefined, string)."""
    shape = list(dims)
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    try:
        _, bits = elem_bits(elem_type, "")
    except (EdgeError, KeyError, TypeError, ValueError):
        return None
    return nbytes_of(shape, bits)


def tensor_bytes(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of every main-graph tensor ONNX shape inference (with data propagation) gives a
    static shape: inputs, outputs, intermediate values, initializers. Values it cannot size are
    left out; a model shape inference rejects gives {}."""
    try:
        g = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True).graph
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError):
        return {}
    sizes: dict[str, int] = {}
    for vi in (*g.input, *g.output, *g.value_info):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            n = static_nbytes(tt.elem_type, dims)
            if n is not None:
                sizes[vi.name] = n
    for t in g.initializer:
        n = static_nbytes(t.data_type, list(t.dims))
        if n is not None:
            sizes[t.name] = n
    return sizes


class Sizer:
    """Turns value types into (shape, dtype, nbytes), resolving named dims or failing helpfully."""

    def __init__(self, resolved: Mapping[str, int]):
        self.resolved = resolved

    def __call__(self, name: str, tp: TypeProto | None, writer: str) -> Sized | None:
        kind = tp.WhichOneof("value") if tp is not None else None
        if kind not in (None, "tensor_type"):
            raise EdgeError(
                f"{name!r} ({writer}) is an ONNX {kind.removesuffix('_type')} value; "
                "the simulator sizes plain tensors only"
            )
        if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
            return None
        dtype, bits = elem_bits(tp.tensor_type.elem_type, name)
        shape: list[int] = []
        for axis, d in enumerate(tp.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif d.dim_param in self.resolved:
                shape.append(self.resolved[d.dim_param])
            else:
                key = d.dim_param or f"<unnamed axis {axis}>"
                fix = (
                    f"pass dims={{{d.dim_param!r}: N}}"
                    if d.dim_param
                    else "pass the batch size or export with static shapes"
                )
                if writer == "graph input" and BATCH_FIRST_RE.match(d.dim_param):
                    fix += " or the batch size (--batch N)"
                raise EdgeError(
                    f"cannot size tensor {name!r} ({writer}): dim {key} is unresolved; {fix}"
                )
        return Sized(name, nbytes_of(shape, bits), tuple(shape), dtype)


def graph_types(g: GraphProto) -> dict[str, TypeProto]:
    types = {vi.name: vi.type for vi in list(g.input) + list(g.output) + list(g.value_info)}
    for t in g.initializer:
        tp = onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims))
        types[t.name] = tp
    return types


def subgraphs(node: onnx.NodeProto) -> list[GraphProto]:
    out: list[GraphProto] = []
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def body_cost(g: GraphProto, size: Sizer) -> tuple[int, set[str]]:
    """(bytes written inside the body, recursively; outer names the body reads)."""
    types = graph_types(g)
    local = {i.name for i in g.input} | {t.name for t in g.initializer}
    written, outer = 0, set()
    for node in g.node:
        for name in node.input:
            if name and name not in local:
                outer.add(name)
        for sub in subgraphs(node):
            cost, refs = body_cost(sub, size)
            written += cost
            outer |= refs - local
        for name in node.output:
            if not name:
                continue
            local.add(name)
            info = size(name, types.get(name), f"inside the body of {node.op_type} {node.name!r}")
            if info is None:
                raise EdgeError(
                    f"cannot size tensor {name!r} inside a {node.op_type} body; the "
                    "simulator needs static shapes for If/Loop/Scan bodies"
                )
            written += info.nbytes
    return written, outer

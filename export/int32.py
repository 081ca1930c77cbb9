"""The int32 form of an integer graph: every integer value int32, products as exact fp32 chunks.

    int32_form(model) -> Int32Form      model: the rewritten graph; feed() / restore() convert
                                        arrays at its interface
    int64_headroom(model, feeds) -> int the largest |value| the plain graph computes in int64

Why: QNN HTP (export.qnn) runs int32 elementwise arithmetic, float32 MatMul / Conv and
movement ops, but no int64 (it truncates int64 tensors to int32), no int8 / uint8 / int16
arithmetic or casts to them, no MatMulInteger / ConvInteger, no integer Pad or Neg, and its
integer Mod is wrong for negative values. The form keeps the integer step's arithmetic and
changes how it is written:

  products    MatMulInteger / ConvInteger -> Cast to float32, MatMul / Conv over chunks of
              the reduction (input channels per group for a convolution) small enough that
              chunk x max|a| x max|b| <= 2^24, each chunk's result cast to int32, the chunks
              added in int32: every partial sum of a chunk is an integer below 2^24, exact in
              float32 in any summation order (the eager kernels' own scheme, edge.layers.intops)
  Mod(x, d)   r0 = x - d Div(x, d); r0 + d Clip(-r0, 0, 1): floor mod whether Div truncates
              (ONNX) or floors (HTP, for a power-of-two d); a floor division Div(x - Mod(x, d), d)
              becomes Div(x, d) - Clip(-r0, 0, 1); any other integer Div(x, d) gets the fix-up
              that makes it truncate either way
  Neg(x)      0 - x;  Pad(x) with zeros -> Concat with zero constants
  types       int8 / uint8 / int16 / uint16 / int64 values -> int32; Cast between integer
              types -> the value itself (a narrowing Cast only where interval analysis proves
              its input inside the narrow range: the Clip before every narrowing Cast);
              arithmetic typed narrower than int32 only where its result provably fits;
              Cast(int -> double) -> Cast(float) feeding only Casts to float -> one Cast
              (int -> float rounds once either way); shape inputs (Reshape, Slice, axes, pads)
              stay int64 constants
  interface   int16 inputs stay int16 (cast to int32 inside); other integer inputs are fed
              as int32, integer outputs come back as int32: feed() / restore() convert, and
              refuse a value outside the original type's range

Exactness: the form computes the plain graph's values bit for bit whenever every value the
plain graph holds in int64 lies inside int32 (the int8 / int16 values are proved, the int64
ones cannot be: their bounds depend on the data). `int64_headroom` measures it on given
inputs; the step's saturating int32 accumulators and Clips keep the values far below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from edge.errors import EdgeError

F32_EXACT = 1 << 24  # float32 holds every integer of magnitude <= 2^24
MAX_RANK = 4  # QNN HTP's Transpose
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INTS = {TP.INT8: np.int8, TP.UINT8: np.uint8, TP.INT16: np.int16, TP.UINT16: np.uint16,
        TP.INT32: np.int32, TP.UINT32: np.uint32, TP.INT64: np.int64, TP.UINT64: np.uint64}
NARROW = frozenset((TP.INT8, TP.UINT8, TP.INT16, TP.UINT16))
KEPT_INPUTS = frozenset((TP.INT16,))  # fed as they are (QNN casts int16 -> int32 on the HTP)
# inputs that are shapes, indices or axes: int64 constants, left alone
SHAPE_SLOTS: dict[str, frozenset[int]] = {
    "Reshape": frozenset({1}), "Slice": frozenset({1, 2, 3, 4}), "Unsqueeze": frozenset({1}),
    "Squeeze": frozenset({1}), "ReduceSum": frozenset({1}), "ReduceMax": frozenset({1}),
    "ReduceMin": frozenset({1}), "Pad": frozenset({1, 3}), "ConstantOfShape": frozenset({0}),
    "Expand": frozenset({1}), "Tile": frozenset({1}), "Split": frozenset({1}),
    "Gather": frozenset({1}),
}
ARITHMETIC = frozenset("Add Sub Mul Div Mod Neg Abs ReduceSum Sum".split())
MOVES = frozenset("Identity Reshape Flatten Unsqueeze Squeeze Transpose Slice Concat Expand "
                  "Tile Gather Split Max Min".split())
Range = tuple[int, int]


@dataclass(frozen=True)
class Int32Form:
    """The rewritten graph and what its interface takes and gives (module docstring)."""

    model: onnx.ModelProto
    inputs: dict[str, Any] = field(default_factory=dict)  # name -> dtype the form is fed
    outputs: dict[str, Any] = field(default_factory=dict)  # name -> dtype the plain graph gives

    def feed(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: _convert(a, self.inputs[n], n) if n in self.inputs else a
                for n, a in arrays.items()}

    def restore(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n: _convert(a, self.outputs[n], n) if n in self.outputs else a
                for n, a in outputs.items()}


def _convert(a: np.ndarray, dtype: Any, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == dtype:
        return a
    info = np.iinfo(dtype)
    if a.size and (int(a.min()) < info.min or int(a.max()) > info.max):
        raise EdgeError(f"{name} holds values outside {np.dtype(dtype).name}: the int32 form "
                        f"cannot carry them")
    return a.astype(dtype)


def is_integer_graph(model: onnx.ModelProto) -> bool:
    """Whether the graph is an integer step (integer products, no float parameters)."""
    return any(n.op_type in ("MatMulInteger", "ConvInteger") for n in model.graph.node)


# ------------------------------------------------------------------------------ ranges


def _dtype_range(t: int) -> Range:
    if t in INTS:
        info = np.iinfo(INTS[t])
        return int(info.min), int(info.max)
    return -(2**127), 2**127


class _Graph:
    """Types, shapes, constants and interval bounds of the values of a shape-inferred graph."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.types: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...] | None] = {}
        for v in [*g.input, *g.value_info, *g.output]:
            tt = v.type.tensor_type
            self.types[v.name] = tt.elem_type
            dims = tt.shape.dim if tt.HasField("shape") else None
            static = dims is not None and all(d.HasField("dim_value") for d in dims)
            self.shapes[v.name] = tuple(d.dim_value for d in dims) if static else None
        self.consts: dict[str, np.ndarray] = {}
        for init in g.initializer:
            a = numpy_helper.to_array(init)
            self.consts[init.name] = a
            self.types[init.name], self.shapes[init.name] = init.data_type, a.shape
        for n in g.node:
            if n.op_type == "Constant":
                a = numpy_helper.to_array(helper.get_attribute_value(n.attribute[0]))
                self.consts[n.output[0]] = a
                self.types[n.output[0]] = helper.np_dtype_to_tensor_dtype(a.dtype)
                self.shapes[n.output[0]] = a.shape
        self.producer = {o: n for n in g.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.ranges: dict[str, Range] = {v.name: _dtype_range(v.type.tensor_type.elem_type)
                                         for v in g.input
                                         if v.type.tensor_type.elem_type in INTS}
        for name, a in self.consts.items():
            if np.issubdtype(a.dtype, np.integer) and a.size:
                self.ranges[name] = (int(a.min()), int(a.max()))
        for n in g.node:
            self._propagate(n)

    def range(self, name: str) -> Range:
        """Proved bounds of a value, or its type's range where there is no proof."""
        return self.ranges.get(name) or _dtype_range(self.types.get(name, TP.INT64))

    def const_int(self, name: str) -> int | None:
        a = self.consts.get(name)
        return int(a.reshape(())) if a is not None and a.size == 1 and \
            np.issubdtype(a.dtype, np.integer) else None

    def _propagate(self, n: onnx.NodeProto) -> None:
        if not n.output or self.types.get(n.output[0]) not in INTS:
            return
        r = self._bound(n)
        lo, hi = _dtype_range(self.types[n.output[0]])
        if r is not None and lo <= r[0] and r[1] <= hi:  # else: may wrap, no bound recorded
            for o in n.output:
                self.ranges[o] = r

    def _bound(self, n: onnx.NodeProto) -> Range | None:
        op, ins = n.op_type, [self.range(i) for i in n.input if i]
        if op == "Cast":
            return ins[0]
        if op == "Clip":
            lo, hi = ins[0]
            if len(n.input) > 1 and n.input[1]:
                lo = max(lo, self.range(n.input[1])[0])
            if len(n.input) > 2 and n.input[2]:
                hi = min(hi, self.range(n.input[2])[1])
            return (lo, hi) if lo <= hi else (hi, hi)
        if op == "Add":
            return ins[0][0] + ins[1][0], ins[0][1] + ins[1][1]
        if op == "Sub":
            return ins[0][0] - ins[1][1], ins[0][1] - ins[1][0]
        if op == "Mul":
            p = [a * b for a in ins[0] for b in ins[1]]
            return min(p), max(p)
        if op == "Neg":
            return -ins[0][1], -ins[0][0]
        if op == "Abs":
            lo, hi = ins[0]
            return (0 if lo <= 0 <= hi else min(abs(lo), abs(hi))), max(abs(lo), abs(hi))
        if op in ("Max", "Min"):
            pick = max if op == "Max" else min
            return pick(r[0] for r in ins), pick(r[1] for r in ins)
        if op in ("Div", "Mod"):
            d = self.const_int(n.input[1])
            if d is None or d <= 0:
                return None
            if op == "Mod":
                return 0, d - 1
            return ins[0][0] // d, -(-ins[0][1] // d)
        if op == "ReduceSum":
            shape = self.shapes.get(n.input[0])
            out = self.shapes.get(n.output[0])
            if shape is None or out is None:
                return None
            count = int(np.prod(shape)) // max(1, int(np.prod(out)))
            return ins[0][0] * count, ins[0][1] * count
        if op == "ConstantOfShape":
            attr = [a for a in n.attribute if a.name == "value"]
            v = int(numpy_helper.to_array(attr[0].t).reshape(())) if attr else 0
            return v, v
        if op == "Pad":
            value = self.range(n.input[2]) if len(n.input) > 2 and n.input[2] else (0, 0)
            return min(ins[0][0], value[0]), max(ins[0][1], value[1])
        if op in MOVES:
            data = [self.range(i) for k, i in enumerate(n.input)
                    if i and k not in SHAPE_SLOTS.get(op, ())]
            return min(r[0] for r in data), max(r[1] for r in data)
        return None


# ------------------------------------------------------------------------------ rewrite


class _Writer:
    def __init__(self, src: _Graph, shape_only: set[str]):
        self.src, self.shape_only = src, shape_only
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, TP] = {}
        self.alias: dict[str, str] = {}  # a value of the plain graph -> the form's value
        self.floors: dict[tuple[str, str, int], tuple[str, str]] = {}  # Mod -> (q0, neg)
        self.kept_inputs: dict[str, str] = {}  # the fed int16 input -> the graph's name
        self.graph_inputs: list[onnx.ValueInfoProto] = []
        self.opset: list[onnx.OperatorSetIdProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"i32/{hint}_{self.count}"

    def get(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def const(self, value: Any, dtype: Any = np.int32) -> str:
        a = np.asarray(value, dtype=dtype)
        key = f"i32/c_{np.dtype(dtype).name}_{'x'.join(map(str, a.shape))}_" + \
              "_".join(str(v) for v in a.flatten()[:8]) + (f"_n{a.size}" if a.size > 8 else "")
        if a.size > 8 or key in self.inits and not np.array_equal(
                numpy_helper.to_array(self.inits[key]), a):
            key = self.name("c")
        self.inits.setdefault(key, numpy_helper.from_array(a, key))
        return key

    def op(self, op_type: str, inputs: list[str], hint: str = "", out: str | None = None,
           **attrs: Any) -> str:
        out = out or self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out


def int32_form(model: onnx.ModelProto) -> Int32Form:
    """`model` (an integer step in the npu profile, static shapes) in the int32 form."""
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    src = _Graph(model)
    g = model.graph
    w = _Writer(src, _shape_only_constants(g))
    inputs_fed: dict[str, Any] = {}
    new_inputs = []
    for v in g.input:
        t = v.type.tensor_type.elem_type
        if t not in INTS or t == TP.INT32:
            new_inputs.append(v)
            continue
        shape = [d.dim_value for d in v.type.tensor_type.shape.dim]
        if t in KEPT_INPUTS:
            fed = w.name("in")
            new_inputs.append(helper.make_tensor_value_info(fed, t, shape))
            w.op("Cast", [fed], out=v.name, to=TP.INT32)
            w.kept_inputs[fed] = v.name
        else:
            new_inputs.append(helper.make_tensor_value_info(v.name, TP.INT32, shape))
            inputs_fed[v.name] = np.int32
    for init in g.initializer:
        if init.name in w.shape_only or init.data_type not in INTS or init.data_type == TP.INT32:
            w.inits[init.name] = init
            continue
        a = numpy_helper.to_array(init)
        if a.size and (int(a.min()) < INT32_MIN or int(a.max()) > INT32_MAX):
            raise EdgeError(f"the integer graph's constant {init.name} does not fit int32")
        w.inits[init.name] = numpy_helper.from_array(a.astype(np.int32), init.name)
    for n in g.node:
        _rewrite(w, n)
    outputs_back: dict[str, Any] = {}
    new_outputs = []
    for v in g.output:
        t = v.type.tensor_type.elem_type
        shape = [d.dim_value for d in v.type.tensor_type.shape.dim]
        src_name = w.get(v.name)
        if src_name != v.name:
            w.op("Identity", [src_name], out=v.name)
        if t in INTS and t != TP.INT32:
            new_outputs.append(helper.make_tensor_value_info(v.name, TP.INT32, shape))
            outputs_back[v.name] = INTS[t]
        elif t == TP.DOUBLE:
            raise EdgeError(f"output {v.name} is float64, which QNN HTP has no type for")
        else:
            new_outputs.append(v)
    w.graph_inputs, w.opset = new_inputs, list(model.opset_import)
    _transposes(w)
    out = _assemble(model, w, new_inputs, new_outputs)
    if w.kept_inputs:  # int16 inputs: the fed one takes the graph's name, its cast a new one
        out = _rename_kept_inputs(out, w.kept_inputs)
    return Int32Form(out, inputs_fed, outputs_back)


def _shape_only_constants(g: onnx.GraphProto) -> set[str]:
    data, shape = set(), set()
    for n in g.node:
        for k, i in enumerate(n.input):
            (shape if k in SHAPE_SLOTS.get(n.op_type, ()) else data).add(i)
    consts = {i.name for i in g.initializer}
    return (shape - data) & consts


def _int(t: int | None) -> bool:
    return t in INTS


def _rewrite(w: _Writer, n: onnx.NodeProto) -> None:
    src, op = w.src, n.op_type
    ins = [w.get(i) if i else "" for i in n.input]
    out_t = src.types.get(n.output[0]) if n.output else None
    if op in ARITHMETIC and out_t in NARROW and not _fits(src.ranges.get(n.output[0]), out_t):
        raw = w.name("raw")  # computed in int32, then wrapped as the narrow type would
        src.types[raw] = TP.INT32
        _rewrite(w, _renamed_output(n, raw))
        _wrap(w, w.get(raw), out_t, n.output[0])
        return
    for k, i in enumerate(n.input):  # an int64 constant read both as data and as a shape
        if i in w.shape_only and k not in SHAPE_SLOTS.get(op, ()):
            raise EdgeError(f"constant {i} is read as data by {op}")
    if op == "Cast":
        return _cast(w, n, ins)
    if op == "Constant" or op == "ConstantOfShape":
        return _constant(w, n, ins)
    if op in ("MatMulInteger", "ConvInteger"):
        if len([i for i in n.input if i]) > 2:
            raise EdgeError(f"{op} {n.name} has zero points; the int32 form takes none")
        return (_matmul if op == "MatMulInteger" else _conv)(w, n, ins)
    if not _int(out_t) or not any(_int(src.types.get(i)) for i in n.input if i):
        w.nodes.append(_copy(n, ins))
        return
    if op == "Mod":
        return _mod(w, n, ins)
    if op == "Div":
        return _div(w, n, ins)
    if op == "Neg":
        w.op("Sub", [w.const(0), ins[0]], out=n.output[0])
        return
    if op == "Pad":
        return _pad(w, n, ins)
    if op in ("Max", "Min") and len(ins) == 2:
        return _max(w, n, ins)
    w.nodes.append(_copy(n, ins))


def _fits(r: Range | None, t: int) -> bool:
    """Whether values proved to lie in `r` (None: no proof) lie inside type `t`."""
    lo, hi = _dtype_range(t)
    return r is not None and lo <= r[0] and r[1] <= hi


def _wrap(w: _Writer, x: str, t: int, out: str) -> None:
    """x wrapped into type t as a Cast would: lo + floor_mod(x - lo, 2^bits), in int32."""
    lo, hi = _dtype_range(t)
    span = hi - lo + 1
    shifted = w.op("Sub", [x, w.const(lo)]) if lo else x
    tmp = w.name("wrapmod") if lo else out
    _mod(w, helper.make_node("Mod", [shifted, w.const(span)], [tmp], fmod=0),
         [shifted, w.const(span)], span)
    if lo:
        w.op("Add", [tmp, w.const(lo)], out=out)


def _renamed_output(n: onnx.NodeProto, out: str) -> onnx.NodeProto:
    c = onnx.NodeProto()
    c.CopyFrom(n)
    c.output[0] = out
    return c


def _copy(n: onnx.NodeProto, ins: list[str]) -> onnx.NodeProto:
    c = onnx.NodeProto()
    c.CopyFrom(n)
    del c.input[:]
    c.input.extend(ins)
    return c


def _cast(w: _Writer, n: onnx.NodeProto, ins: list[str]) -> None:
    src = w.src
    to = next(a.i for a in n.attribute if a.name == "to")
    x_t = src.types.get(n.input[0])
    if to in INTS:
        if not _int(x_t):
            if to in NARROW:
                raise EdgeError(f"Cast {n.name} of a float to {TP.DataType.Name(to).lower()}")
            w.op("Cast", ins, out=n.output[0], to=TP.INT32)
            return
        if to in NARROW and not _fits(src.ranges.get(n.input[0]), to):
            _wrap(w, ins[0], to, n.output[0])  # no proof that it cannot wrap: wrap in int32
        else:
            w.alias[n.output[0]] = ins[0]
        return
    if to == TP.DOUBLE:
        readers = src.readers.get(n.output[0], [])
        if not readers or any(m.op_type != "Cast" or m.attribute[0].i != TP.FLOAT
                              for m in readers):
            raise EdgeError(f"Cast {n.name} to float64: QNN HTP has no float64")
        w.alias[n.output[0]] = ins[0]  # the Casts to float read the value itself
        return
    if _int(x_t) or x_t == TP.DOUBLE:
        w.op("Cast", ins, out=n.output[0], to=to)
        return
    w.nodes.append(_copy(n, ins))


def _constant(w: _Writer, n: onnx.NodeProto, ins: list[str]) -> None:
    attr = n.attribute[0] if n.attribute else None
    if attr is None or attr.type != onnx.AttributeProto.TENSOR or attr.t.data_type not in INTS \
            or attr.t.data_type == TP.INT32 or _shape_input(w.src, n.output[0]):
        w.nodes.append(_copy(n, ins))
        return
    a = numpy_helper.to_array(attr.t)
    if a.size and (int(a.min()) < INT32_MIN or int(a.max()) > INT32_MAX):
        raise EdgeError(f"{n.op_type} {n.name} holds a value outside int32")
    w.nodes.append(helper.make_node(n.op_type, ins, list(n.output),
                                    value=numpy_helper.from_array(a.astype(np.int32))))


def _shape_input(src: _Graph, name: str) -> bool:
    return all(k in SHAPE_SLOTS.get(m.op_type, ()) for m in src.readers.get(name, [])
               for k, i in enumerate(m.input) if i == name)


def _bound(w: _Writer, name: str) -> int:
    lo, hi = w.src.range(name)
    return max(abs(lo), abs(hi), 1)


def _matmul(w: _Writer, n: onnx.NodeProto, ins: list[str]) -> None:
    a_shape, b_shape = w.src.shapes.get(n.input[0]), w.src.shapes.get(n.input[1])
    if a_shape is None or b_shape is None or len(b_shape) != 2:
        raise EdgeError(f"MatMulInteger {n.name} needs static shapes and a 2-D right operand")
    k = a_shape[-1]
    chunk = max(1, F32_EXACT // (_bound(w, n.input[0]) * _bound(w, n.input[1])))
    af = w.op("Cast", [ins[0]], "af", to=TP.FLOAT)
    bf = w.op("Cast", [ins[1]], "bf", to=TP.FLOAT)
    parts = []
    for s in range(0, k, chunk):
        e = min(k, s + chunk)
        a_c, b_c = af, bf
        if (s, e) != (0, k):
            a_c = w.op("Slice", [af, _i64(w, [s]), _i64(w, [e]), _i64(w, [len(a_shape) - 1])])
            b_c = w.op("Slice", [bf, _i64(w, [s]), _i64(w, [e]), _i64(w, [0])])
        parts.append(w.op("Cast", [w.op("MatMul", [a_c, b_c])], "mm", to=TP.INT32))
    _sum(w, parts, n.output[0])


def _i64(w: _Writer, v: list[int]) -> str:
    return w.const(v, np.int64)


def _sum(w: _Writer, parts: list[str], out: str) -> None:
    total = parts[0]
    for i, p in enumerate(parts[1:], 1):
        total = w.op("Add", [total, p], out=out if i == len(parts) - 1 else None)
    if len(parts) == 1:
        w.alias[out] = total


def _conv(w: _Writer, n: onnx.NodeProto, ins: list[str]) -> None:
    x_shape, w_shape = w.src.shapes.get(n.input[0]), w.src.shapes.get(n.input[1])
    if x_shape is None or w_shape is None or len(x_shape) != 4:
        raise EdgeError(f"ConvInteger {n.name} needs static 2-D shapes")
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    groups = int(attrs.get("group", 1))
    kh, kw = w_shape[2], w_shape[3]
    cg = w_shape[1]
    chunk = max(1, F32_EXACT // (kh * kw * _bound(w, n.input[0]) * _bound(w, n.input[1])))
    xf = w.op("Cast", [ins[0]], "xf", to=TP.FLOAT)
    wf = w.op("Cast", [ins[1]], "wf", to=TP.FLOAT)
    nb, _, h, wd = x_shape
    parts = []
    for s in range(0, cg, chunk):
        e = min(cg, s + chunk)
        x_c, w_c = xf, wf
        if (s, e) != (0, cg) and groups == 1:
            x_c = w.op("Slice", [xf, _i64(w, [s]), _i64(w, [e]), _i64(w, [1])])
            w_c = w.op("Slice", [wf, _i64(w, [s]), _i64(w, [e]), _i64(w, [1])])
        elif (s, e) != (0, cg):  # the slice of every group's channels, at rank 4
            xg = w.op("Reshape", [xf, _i64(w, [nb, groups, cg, h * wd])])
            xg = w.op("Slice", [xg, _i64(w, [s]), _i64(w, [e]), _i64(w, [2])])
            x_c = w.op("Reshape", [xg, _i64(w, [nb, groups * (e - s), h, wd])])
            w_c = w.op("Slice", [wf, _i64(w, [s]), _i64(w, [e]), _i64(w, [1])])
        y = w.op("Conv", [x_c, w_c], "conv", **attrs)
        parts.append(w.op("Cast", [y], "cv", to=TP.INT32))
    _sum(w, parts, n.output[0])


def _divisor(w: _Writer, n: onnx.NodeProto) -> int:
    d = w.src.const_int(n.input[1])
    fmod = next((a.i for a in n.attribute if a.name == "fmod"), 0)
    if d is None or d <= 0 or fmod:
        raise EdgeError(f"{n.op_type} {n.name} is not by a positive constant; the int32 form "
                        f"takes only those")
    return d


def _mod(w: _Writer, n: onnx.NodeProto, ins: list[str], d: int | None = None) -> None:
    d = d or _divisor(w, n)
    dc = w.const(d)
    q0 = w.op("Div", [ins[0], dc], "q0")
    r0 = w.op("Sub", [ins[0], w.op("Mul", [q0, dc])], "r0")
    neg = w.op("Clip", [w.op("Sub", [w.const(0), r0]), w.const(0), w.const(1)], "neg")
    w.op("Add", [r0, w.op("Mul", [neg, dc])], out=n.output[0])
    if n.name or n.output[0] in w.src.types:  # a Mod of the graph: floor divisions may read it
        w.floors[(n.output[0], ins[0], d)] = (q0, neg)


def _div(w: _Writer, n: onnx.NodeProto, ins: list[str]) -> None:
    d = _divisor(w, n)
    sub = w.src.producer.get(n.input[0])
    if sub is not None and sub.op_type == "Sub":
        for (mod_out, x, dm), (q0, neg) in w.floors.items():
            if dm == d and w.get(sub.input[1]) == w.get(mod_out) and w.get(sub.input[0]) == x:
                w.op("Sub", [q0, neg], out=n.output[0])  # floor(x / d)
                return
    dc = w.const(d)
    q0 = w.op("Div", [ins[0], dc], "q0")
    r0 = w.op("Sub", [ins[0], w.op("Mul", [q0, dc])], "r0")
    up = w.op("Mul", [w.op("Clip", [r0, w.const(0), w.const(1)]),
                      w.op("Clip", [w.op("Sub", [w.const(0), ins[0]]), w.const(0), w.const(1)])])
    w.op("Add", [q0, up], out=n.output[0])  # truncation, whichever way Div rounds


def _max(w: _Writer, n: onnx.NodeProto, ins: list[str]) -> None:
    """max(a, b) = a + Clip(b - a, 0), min(a, b) = a - Clip(a - b, 0), where b - a provably
    fits int32: QNN HTP's fp32 graph finalisation fails (QNN_COMMON_ERROR_MEM_ALLOC) for some
    int32 Max between float convolutions, and takes this form."""
    (alo, ahi), (blo, bhi) = w.src.range(n.input[0]), w.src.range(n.input[1])
    if min(alo - bhi, blo - ahi) < INT32_MIN or max(ahi - blo, bhi - alo) > INT32_MAX:
        w.nodes.append(_copy(n, ins))
        return
    a, b = ins
    zero = w.const(0)
    if n.op_type == "Max":
        w.op("Add", [a, w.op("Clip", [w.op("Sub", [b, a]), zero], "up")], out=n.output[0])
    else:
        w.op("Sub", [a, w.op("Clip", [w.op("Sub", [a, b]), zero], "down")], out=n.output[0])


def _pad(w: _Writer, n: onnx.NodeProto, ins: list[str]) -> None:
    mode = next((a.s for a in n.attribute if a.name == "mode"), b"constant")
    pads = w.src.consts.get(n.input[1]) if len(n.input) > 1 else None
    value = w.src.const_int(n.input[2]) if len(n.input) > 2 and n.input[2] else 0
    shape = w.src.shapes.get(n.input[0])
    if mode != b"constant" or pads is None or shape is None or (len(n.input) > 3 and n.input[3]):
        raise EdgeError(f"Pad {n.name}: the int32 form takes constant zero pads of static shapes")
    pads = [int(p) for p in pads]
    if min(pads) < 0:
        raise EdgeError(f"Pad {n.name} has negative pads")
    if not any(pads):
        w.alias[n.output[0]] = ins[0]
        return
    if _bound(w, n.input[0]) <= F32_EXACT and abs(value or 0) <= F32_EXACT:
        # exact in float32; QNN HTP's int32 Concat along the last axis misplaces values
        xf = w.op("Cast", [ins[0]], "padf", to=TP.FLOAT)
        pf = w.op("Pad", [xf, ins[1], w.const(float(value or 0), np.float32)], "pad",
                  mode="constant")
        w.op("Cast", [pf], out=n.output[0], to=TP.INT32)
        return
    rank, x, cur = len(shape), ins[0], list(shape)
    for ax in range(rank):
        before, after = pads[ax], pads[rank + ax]
        if not before and not after:
            continue
        pieces = []
        for size in (before, None, after):
            if size is None:
                pieces.append(x)
            elif size:
                block = [*cur[:ax], size, *cur[ax + 1:]]
                pieces.append(w.const(np.full(block, value or 0)))
        cur[ax] += before + after
        x = w.op("Concat", pieces, "pad", axis=ax)
    if x == ins[0]:
        w.alias[n.output[0]] = x
    else:
        w.nodes[-1].output[0] = n.output[0]


def _transposes(w: _Writer) -> None:
    """Every Transpose of rank > MAX_RANK as Reshape, a Transpose of the same data with size-1
    axes dropped and axes that move together merged, Reshape; then Reshape chains composed (a
    Reshape of a Reshape reads the first one's input), so no tensor of rank > 5 is left
    between them. QNN HTP takes no Transpose above rank 4 and no Reshape to or from rank 6."""
    shapes = _shapes_of(w)
    nodes = []
    for m in w.nodes:
        out_shape = shapes.get(m.output[0]) if m.output else None
        if m.op_type in ("Unsqueeze", "Squeeze", "Flatten") and out_shape is not None:
            nodes.append(helper.make_node("Reshape", [m.input[0], _i64(w, list(out_shape))],
                                          list(m.output)))  # so that Reshape chains compose
            continue
        if m.op_type == "Concat" and out_shape is not None and len(out_shape) > MAX_RANK:
            nodes.extend(_flat_concat(w, m, shapes, out_shape))
            continue
        x = shapes.get(m.input[0]) if m.op_type == "Transpose" else None
        if x is None or len(x) <= MAX_RANK:
            nodes.append(m)
            continue
        perm = list(helper.get_attribute_value(m.attribute[0])) if m.attribute else \
            list(range(len(x)))[::-1]
        small, order = _merged(x, perm)
        if len(small) > MAX_RANK:
            raise EdgeError(f"Transpose {m.name or m.output[0]} of rank {len(x)} does not "
                            f"reduce to rank {MAX_RANK}")
        flat = w.name("tin")
        nodes.append(helper.make_node("Reshape", [m.input[0], _i64(w, small)], [flat]))
        moved = w.name("tmoved")
        nodes.append(helper.make_node("Transpose", [flat], [moved], perm=order))
        out = [x[p] for p in perm]
        nodes.append(helper.make_node("Reshape", [moved, _i64(w, out)], [m.output[0]]))
    producer = {o: m for m in nodes for o in m.output}
    for m in nodes:
        if m.op_type != "Reshape":
            continue
        src = producer.get(m.input[0])
        while src is not None and src.op_type == "Reshape":
            m.input[0] = src.input[0]
            src = producer.get(m.input[0])
    w.nodes = nodes


def _flat_concat(w: _Writer, m: onnx.NodeProto, shapes: dict[str, tuple[int, ...]],
                 out: tuple[int, ...]) -> list[onnx.NodeProto]:
    """A Concat of rank > MAX_RANK as one of rank 3: (before the axis, axis, after it)."""
    axis = next((a.i for a in m.attribute if a.name == "axis"), 0) % len(out)
    before, after = int(np.prod(out[:axis])), int(np.prod(out[axis + 1:]))
    nodes, flat = [], []
    for i in m.input:
        f = w.name("cin")
        nodes.append(helper.make_node("Reshape", [i, _i64(w, [before, shapes[i][axis], after])],
                                      [f]))
        flat.append(f)
    cat = w.name("cat")
    nodes.append(helper.make_node("Concat", flat, [cat], axis=1))
    nodes.append(helper.make_node("Reshape", [cat, _i64(w, list(out))], list(m.output)))
    return nodes


def _merged(shape: tuple[int, ...], perm: list[int]) -> tuple[list[int], list[int]]:
    """The smallest-rank equivalent of transposing `shape` by `perm`: the input shape with
    size-1 axes dropped and runs of axes that stay adjacent in the output merged, and the
    permutation of the merged axes."""
    keep = [p for p in perm if shape[p] != 1]  # output order of the axes that matter
    runs: list[list[int]] = []
    for p in keep:
        if runs and runs[-1][-1] + 1 == p:
            runs[-1].append(p)
        else:
            runs.append([p])
    by_input = sorted(range(len(runs)), key=lambda r: runs[r][0])
    small = [int(np.prod([shape[a] for a in runs[r]])) for r in by_input]
    order = [by_input.index(r) for r in range(len(runs))]
    return small or [1], order or [0]


def _shapes_of(w: _Writer) -> dict[str, tuple[int, ...]]:
    """Static shapes of every value the writer has emitted (ONNX shape inference)."""
    g = helper.make_graph(w.nodes, "shapes", [], [], list(w.inits.values()))
    g.input.extend(w.graph_inputs)
    m = helper.make_model(g, opset_imports=w.opset)
    m = onnx.shape_inference.infer_shapes(m)
    out = {}
    for v in [*m.graph.value_info, *m.graph.input]:
        dims = v.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            out[v.name] = tuple(d.dim_value for d in dims)
    return out


def _assemble(model: onnx.ModelProto, w: _Writer, inputs: list, outputs: list) -> onnx.ModelProto:
    nodes = [_renamed(m, w) for m in w.nodes]
    live = {o.name for o in outputs}
    kept = []
    for m in reversed(nodes):  # drop what nobody reads
        if any(o in live for o in m.output):
            kept.append(m)
            live.update(i for i in m.input if i)
    kept.reverse()
    inits = [t for name, t in w.inits.items() if name in live]
    graph = helper.make_graph(kept, model.graph.name, inputs, outputs, inits)
    out = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    onnx.checker.check_model(out)
    return out


def _renamed(m: onnx.NodeProto, w: _Writer) -> onnx.NodeProto:
    c = onnx.NodeProto()
    c.CopyFrom(m)
    for k, i in enumerate(c.input):
        c.input[k] = w.get(i) if i else i
    return c


def _rename_kept_inputs(model: onnx.ModelProto, renames: dict[str, str]) -> onnx.ModelProto:
    """Swap names so that an int16 input keeps the plain graph's name."""
    mapping = {}
    for fed, orig in renames.items():
        mapping[orig] = f"i32/{orig}"
        mapping[fed] = orig
    for v in model.graph.input:
        v.name = mapping.get(v.name, v.name)
    for m in model.graph.node:
        for k, i in enumerate(m.input):
            m.input[k] = mapping.get(i, i)
        for k, o in enumerate(m.output):
            m.output[k] = mapping.get(o, o)
    for v in model.graph.value_info:
        v.name = mapping.get(v.name, v.name)
    return model


# ------------------------------------------------------------------------------ headroom


def int64_headroom(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """The largest |value| of any int64 value the plain graph computes (constants aside) on
    `feeds`, run by onnxruntime: the int32 form is exact while it stays <= 2^31 - 1."""
    import onnxruntime

    m = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    consts = {i.name for i in m.graph.initializer}
    have = {o.name for o in m.graph.output}
    wide = [v.name for v in m.graph.value_info if v.type.tensor_type.elem_type == TP.INT64
            and v.name not in consts]
    m.graph.output.extend(helper.make_tensor_value_info(n, TP.INT64, None) for n in wide
                          if n not in have)
    wide += [o.name for o in model.graph.output if o.type.tensor_type.elem_type == TP.INT64]
    opts = onnxruntime.SessionOptions()
    opts.log_severity_level = 3
    sess = onnxruntime.InferenceSession(m.SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, feeds), strict=True))
    return max((int(np.abs(outs[n]).max()) for n in wide if outs[n].size), default=0)

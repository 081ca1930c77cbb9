"""Operator profiles of exported graphs: `plain` (as traced) and `npu` (what NPU compilers take).

    apply_profile(model, profile) -> model      profile in PROFILES; "plain" returns it as is
    npu_profile(model) -> model                 the npu profile (the passes below, in order)
    npu_violations(model) -> list[str]          what keeps a graph out of the npu profile
    profile_bundle(bundle, profile) -> files    a written bundle's training graphs, rewritten

Why: NPU graph compilers (QNN HTP, IREE's embedded targets, vendor toolchains) want static
shapes and plain arithmetic. A comparison whose boolean feeds arithmetic through Cast, Where
or Sign fails QNN HTP's fp32 graph finalisation (QNN_COMMON_ERROR_MEM_ALLOC), and scatters,
MaxPool's Indices output and Range are not QNN ops. The traced layer library emits none of
the latter (max-pool routing is Where + stack / pad, see `edge.layers.pool`), but it compares
a lot: max-pool windows (Equal of a slice of x and the pooled y, on floats or 8-bit / int32
integers), argmax offsets (Equal of a uint8 tensor and a constant), activation masks. The npu
profile rewrites booleans into arithmetic and leaves everything else alone. Its contract:

  interface   the same graph inputs and outputs (names, dtypes, shapes) as the plain graph
  numbers     the same values for finite inputs, each rewrite exact in IEEE arithmetic with
              gradual underflow and in integer arithmetic without overflow (NaN propagates
              differently, and a zero may come out with the other sign: 0 * -3 = -0 where
              Where picks a +0; a step whose numbers are NaN is already lost, and training
              stops on a non-finite loss)
  operators   no Greater / Less / GreaterOrEqual / LessOrEqual / Equal / Not / And / Or / Xor
              / Where / Sign / ScatterElements / ScatterND / Range / NonZero, no Cast from
              bool, no MaxPool Indices output, every main-graph tensor's shape static
              (`npu_violations` checks all of it; operators in If / Loop / Scan bodies too,
              which the passes below do not rewrite)

The passes, in order:
  1. fold     `export.passes.FoldPass`: constants folded (small ConstantOfShape chains too, e.g.
              a Pad's pads) and lifted to initializers, so shapes are static and no comparison
              is left in shape computations; then ONNX shape inference for every value's type
  2. booleans `BooleansToArithmeticPass`: every boolean of the main graph becomes a 0/1
              tensor of a numeric type, and its readers read that instead:
              float    a > b  ->  Ceil(Clip(a - b, 0, 1))   (a - b > 0 iff a > b, exactly, with
                                  gradual underflow; Clip / Ceil map (0, 1] to 1 and <= 0 to 0)
                       a == b ->  1 - Ceil(Clip(Abs(a - b), 0, 1));  <, >=, <= likewise
              integer, one side a constant scalar c (no subtraction of the two sides):
                       a > c  ->  Clip(a, c, c + 1) - c,  a < c -> c - Clip(a, c - 1, c);
                       >=, <=, == from those at c - 1, c + 1 (a constant 0 or 1 where c is at
                       the type's limit); int16 / uint16 first cast to int32 (onnxruntime has
                       no Clip for them)
              integer, two tensors: both widened before the subtraction, int8 / uint8 / int16
                       / uint16 to int32 and int32 / uint32 to int64, so a - b cannot overflow;
                       then a > b -> Clip(a - b, 0, 1), a == b -> 1 - Clip(Abs(a - b), 0, 1).
                       Two int64 / uint64 tensors have no wider type: left, and reported
              Not / And / Or / Xor -> 1 - s, s t, s + t - s t, s + t - 2 s t;  bool == bool is
                       1 - xor
              Cast(bool -> T) -> the 0/1 tensor (cast to T if it is not of type T);
              Cast(x -> bool) -> [x != 0] (1 - the == 0 form)
              Where(s, x, y)  -> s x + (1 - s) y in x's type (float or integer: one of the two
                       products is 0, so nothing overflows); s x for a scalar y = 0,
                       (1 - s) y for a scalar x = 0; 8/16-bit integers (max-pool offsets)
                       of a float step in float32, cast back (exact; NPUs have no narrow
                       integer maths in float graphs)
              Sign(x) -> step(x) - step(-x) for floats, Clip(x, -1, 1) for integers
              Identity / Reshape / (Un)Squeeze / Expand / Transpose / Slice / Flatten / Tile /
              Gather / Concat of booleans -> the same op on the 0/1 tensors
  3. cleanup  common subexpressions merged (the rewrites of two booleans may share a
              widening or a 1 - s), the booleans nobody reads any more removed, shapes
              inferred again
A pattern the profile does not know is left as it is, and `npu_violations` names it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common

from edge.errors import EdgeError
from export.passes import FoldPass, run_passes

PROFILES = ("plain", "npu")
DEFAULT_PROFILE = "plain"
BOOLEAN_OPS = tuple("Greater Less GreaterOrEqual LessOrEqual Equal Not And Or Xor".split())
BANNED_OPS = frozenset(
    (*BOOLEAN_OPS, "Where", "Sign", "ScatterElements", "ScatterND", "Range", "NonZero")
)

D = ir.DataType
FLOATS = frozenset((D.FLOAT, D.FLOAT16, D.DOUBLE, D.BFLOAT16))
INTS = frozenset((D.INT8, D.INT16, D.INT32, D.INT64, D.UINT8, D.UINT16, D.UINT32, D.UINT64))
NARROW_INTS = frozenset((D.INT8, D.UINT8, D.INT16, D.UINT16))  # exact in float32
WIDER = {
    D.INT8: D.INT32,
    D.UINT8: D.INT32,
    D.INT16: D.INT32,
    D.UINT16: D.INT32,
    D.INT32: D.INT64,
    D.UINT32: D.INT64,
}  # exact a - b for any two values
NO_CLIP = frozenset((D.INT16, D.UINT16))  # no onnxruntime Clip kernel: compared in int32
_MOVED = "Identity Reshape Unsqueeze Squeeze Expand Transpose Slice Flatten Tile Gather"
MOVES = frozenset(_MOVED.split())  # data input 0, moved not computed: the same op on 0/1
FLIP = {
    "Greater": "Less",
    "Less": "Greater",
    "GreaterOrEqual": "LessOrEqual",
    "LessOrEqual": "GreaterOrEqual",
    "Equal": "Equal",
}


def apply_profile(model: onnx.ModelProto, profile: str) -> onnx.ModelProto:
    """The model in the named operator profile (see the module docstring)."""
    check_profile(profile)
    if profile == "plain":
        return model
    return npu_profile(model)


def check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise EdgeError(f"unknown operator profile {profile!r}; valid: {', '.join(PROFILES)}")


def _infer() -> common.ShapeInferencePass:
    return common.ShapeInferencePass(strict_mode=False, data_prop=True)


def npu_profile(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` in the npu profile: same interface, same numbers (module docstring)."""
    from export.trace import check_model

    out = run_passes(
        model,
        FoldPass(),
        _infer(),
        BooleansToArithmeticPass(narrow_in_float=not _integer_step(model)),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        _infer(),
    )
    check_model(out, [i.name for i in model.graph.input], [o.name for o in model.graph.output])
    return out


def _integer_step(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("MatMulInteger", "ConvInteger") for n in model.graph.node)


def npu_violations(model: onnx.ModelProto) -> list[str]:
    """Every reason the graph is not in the npu profile: banned operators (with counts),
    MaxPool Indices outputs, casts from bool, main-graph tensors without a static shape."""
    ir_model = ir.serde.deserialize_model(model)
    _infer()(ir_model)
    graph = ir_model.graph
    counts: dict[str, int] = {}
    for n in graph.all_nodes():
        key = None
        if n.domain not in ("", "ai.onnx"):
            continue
        if n.op_type in BANNED_OPS:
            key = n.op_type
        elif n.op_type == "MaxPool" and len(n.outputs) > 1 and n.outputs[1].name:
            key = "MaxPool with Indices"
        elif n.op_type == "Cast" and n.inputs[0] is not None and n.inputs[0].dtype == D.BOOL:
            key = "Cast from bool"
        if key:
            counts[key] = counts.get(key, 0) + 1
    out = [f"{k} x{v}" for k, v in sorted(counts.items())]
    values = [*graph.inputs, *(o for n in graph for o in n.outputs if o.name)]
    dynamic = [v.name or "?" for v in values if not _static(v)]
    if dynamic:
        more = " ..." if len(dynamic) > 5 else ""
        out.append(f"dynamic shapes: {', '.join(dynamic[:5])}{more}")
    return out


def _static(v: ir.Value) -> bool:
    return v.shape is not None and all(isinstance(d, int) for d in v.shape.dims)


class BooleansToArithmeticPass(ir.passes.InPlacePass):
    """Every boolean of the main graph as exact 0/1 arithmetic (module docstring, pass 2).
    Needs the values' dtypes (shape inference first); leaves the dead booleans to
    RemoveUnusedNodesPass. `narrow_in_float`: Where on 8/16-bit integers in float32 (float
    steps; an integer step keeps its integer maths, which export.int32 widens for NPUs)."""

    def __init__(self, narrow_in_float: bool = True):
        super().__init__()
        self.narrow_in_float = narrow_in_float

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rewriter = _Booleans(model.graph, self.narrow_in_float)
        rewriter.run()
        return ir.passes.PassResult(model, modified=rewriter.modified)


def _constant(v: ir.Value | None) -> np.ndarray | None:
    if v is None or v.is_graph_input():
        return None
    t = ir.convenience.get_const_tensor(v)
    return None if t is None else t.numpy()


def _rank(v: ir.Value) -> int | None:
    return None if v.shape is None else v.shape.rank()


def _scalar_like(c: np.ndarray | None, rank: int | None) -> bool:
    """A one-element constant that broadcasting against a rank-`rank` tensor leaves alone."""
    return c is not None and c.size == 1 and rank is not None and c.ndim <= rank


class _Booleans:
    """The rewrite of one graph: `num` maps each boolean value to its 0/1 tensor."""

    def __init__(self, graph: ir.Graph, narrow_in_float: bool = True):
        self.graph = graph
        self.narrow_in_float = narrow_in_float
        self.num: dict[ir.Value, ir.Value] = {}
        self.wide: dict[ir.Value, ir.Value] = {}  # narrow integer -> its exact float32 form
        self.consts: dict[tuple[Any, ...], ir.Value] = {}
        self.names = {
            v.name
            for g in (graph, *graph.subgraphs())
            for v in (*g.inputs, *g.initializers.values(), *(o for n in g for o in n.outputs))
        }
        self.count = 0
        self.at: ir.Node | None = None
        self.modified = False

    # ------------------------------------------------------------------ building blocks
    def op(
        self, op_type: str, inputs: Sequence[ir.Value | None], dtype: ir.DataType, **attrs: Any
    ) -> ir.Value:
        """A new node before the one being rewritten; its output has type `dtype`."""
        out = ir.Value(name=self.fresh("npu"), type=ir.TensorType(dtype))
        node = ir.node(op_type, list(inputs), attrs or None, outputs=[out])
        assert self.at is not None
        self.graph.insert_before(self.at, node)
        self.modified = True
        return out

    def fresh(self, prefix: str) -> str:
        """A value name used nowhere in the graph (onnx_ir's own names may clash with
        initializers of an earlier session)."""
        while f"{prefix}_{self.count}" in self.names:
            self.count += 1
        name = f"{prefix}_{self.count}"
        self.names.add(name)
        return name

    def const(self, value: Any, dtype: ir.DataType) -> ir.Value:
        """A constant initializer (shared by equal constants)."""
        arr = np.asarray(value).astype(dtype.numpy())
        key = (dtype, arr.shape, arr.tobytes())
        if key not in self.consts:
            name = self.fresh("npu_const")
            v = ir.Value(
                name=name,
                shape=ir.Shape(arr.shape),
                type=ir.TensorType(dtype),
                const_value=ir.tensor(arr, dtype=dtype, name=name),
            )
            self.graph.register_initializer(v)
            self.consts[key] = v
        return self.consts[key]

    def cast(self, v: ir.Value, dtype: ir.DataType) -> ir.Value:
        if v.dtype == dtype:
            return v
        c = _constant(v)
        if c is not None:
            return self.const(c, dtype)  # exact: only 0/1 tensors and widenings come here
        return self.op("Cast", [v], dtype, to=dtype)

    def widen(self, v: ir.Value, dtype: ir.DataType) -> ir.Value:
        """`v` in `dtype`: the float32 form kept for a rewritten narrow integer, else a cast."""
        return self.wide[v] if dtype == D.FLOAT and v in self.wide else self.cast(v, dtype)

    def bool01(self, v: ir.Value | None, dtype: ir.DataType | None) -> ir.Value | None:
        """The 0/1 tensor of boolean `v` (a rewritten one, or a constant), in `dtype` when
        given; None when `v` is neither."""
        if v is None:
            return None
        if v in self.num:
            s = self.num[v]
            return s if dtype is None else self.cast(s, dtype)
        c = _constant(v)
        if c is None or c.dtype != np.bool_:
            return None
        return self.const(c, D.INT64 if dtype is None else dtype)

    def replace(self, old: ir.Value, new: ir.Value) -> None:
        """Readers of `old` read `new` (the same values); a graph output keeps its name."""
        if old.is_graph_output():
            if new.producer() is None or new.is_graph_output() or new in self.num.values():
                new = self.op("Identity", [new], new.dtype or D.UNDEFINED)
            name = old.name
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            new.name = name
        else:
            old.replace_all_uses_with(new)
        if new.shape is None:
            new.shape = old.shape
        self.modified = True

    # ------------------------------------------------------------------ the rewrite
    def run(self) -> None:
        handlers = {
            "Cast": self._cast,
            "Where": self._where,
            "Sign": self._sign,
            "Not": self._logic,
            "And": self._logic,
            "Or": self._logic,
            "Xor": self._logic,
            "Concat": self._concat,
        }
        for node in list(self.graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            self.at = node
            if node.op_type in FLIP:
                a, b = node.inputs[0], node.inputs[1]
                s = self.compare(node.op_type, a, b) if a is not None and b is not None else None
                if s is not None:
                    self.num[node.outputs[0]] = s
            elif node.op_type in handlers:
                handlers[node.op_type](node)
            elif node.op_type in MOVES:
                self._move(node)

    def _logic(self, node: ir.Node) -> None:
        first = next((v for v in node.inputs if v in self.num), None)
        if first is None:
            return
        t = self.num[first].dtype
        ins = [self.bool01(v, t) for v in node.inputs]
        if t is None or any(s is None for s in ins):
            return
        s, *rest = ins
        one = self.const(1, t)
        if node.op_type == "Not":
            r = self.op("Sub", [one, s], t)
        else:
            u = rest[0]
            st = self.op("Mul", [s, u], t)
            if node.op_type == "And":
                r = st
            else:
                total = self.op("Add", [s, u], t)
                twice = st if node.op_type == "Or" else self.op("Add", [st, st], t)
                r = self.op("Sub", [total, twice], t)
        self.num[node.outputs[0]] = r

    def _cast(self, node: ir.Node) -> None:
        x, out = node.inputs[0], node.outputs[0]
        to = D(node.attributes["to"].as_int())
        if x is None:
            return
        if x in self.num:
            if to == D.BOOL:
                self.num[out] = self.num[x]
            else:
                self.replace(out, self.cast(self.num[x], to))
        elif to == D.BOOL and x.dtype in FLOATS | INTS:
            eq = self.compare("Equal", x, self.const(0, x.dtype))
            if eq is not None:
                t = eq.dtype or D.INT64
                self.num[out] = self.op("Sub", [self.const(1, t), eq], t)

    def _where(self, node: ir.Node) -> None:
        cond, x, y = node.inputs
        out = node.outputs[0]
        if x is None or y is None or x.dtype != y.dtype or x.dtype not in FLOATS | INTS:
            return
        t = x.dtype
        # NPUs' float graphs have no 8/16-bit integer arithmetic
        u = D.FLOAT if self.narrow_in_float and t in NARROW_INTS else t
        s = self.bool01(cond, u)
        if s is None:
            return
        x, y = self.widen(x, u), self.widen(y, u)  # exact: float32 holds 16-bit integers
        xc, yc, rank = _constant(x), _constant(y), _rank(out)
        if _scalar_like(yc, rank) and not yc.any():
            r = self.op("Mul", [s, x], u)
        elif _scalar_like(xc, rank) and not xc.any():
            r = self.op("Mul", [self.op("Sub", [self.const(1, u), s], u), y], u)
        else:
            sx = self.op("Mul", [s, x], u)
            rest = self.op("Mul", [self.op("Sub", [self.const(1, u), s], u), y], u)
            r = self.op("Add", [sx, rest], u)
        narrow = self.cast(r, t)
        if narrow is not r:
            self.wide[narrow] = r  # its readers here read r (the cast dies unless kept)
        self.replace(out, narrow)

    def _sign(self, node: ir.Node) -> None:
        x, out = node.inputs[0], node.outputs[0]
        t = None if x is None else x.dtype
        if x is None or t not in FLOATS | INTS:
            return
        if t in FLOATS:
            neg = self.op("Neg", [x], t)
            r = self.op("Sub", [self.step(x, t), self.step(neg, t)], t)
        else:
            w = D.INT32 if t in NO_CLIP else t
            lo = -1 if t.is_signed() else 0
            r = self.op("Clip", [self.cast(x, w), self.const(lo, w), self.const(1, w)], w)
            r = self.cast(r, t)
        self.replace(out, r)

    def _move(self, node: ir.Node) -> None:
        x = node.inputs[0]
        if x not in self.num:
            return
        s = self.num[x]
        attrs = {a.name: a.value for a in node.attributes.values()}
        self.num[node.outputs[0]] = self.op(
            node.op_type, [s, *node.inputs[1:]], s.dtype or D.INT64, **attrs
        )

    def _concat(self, node: ir.Node) -> None:
        first = next((v for v in node.inputs if v in self.num), None)
        if first is None:
            return
        t = self.num[first].dtype
        ins = [self.bool01(v, t) for v in node.inputs]
        if t is None or any(s is None for s in ins):
            return
        axis = node.attributes["axis"].as_int()
        self.num[node.outputs[0]] = self.op("Concat", ins, t, axis=axis)

    # ------------------------------------------------------------------ comparisons
    def step(self, d: ir.Value, t: ir.DataType) -> ir.Value:
        """[d > 0] for a float tensor d: Ceil(Clip(d, 0, 1)), exact."""
        clip = self.op("Clip", [d, self.const(0, t), self.const(1, t)], t)
        return self.op("Ceil", [clip], t)

    def compare(self, op: str, a: ir.Value, b: ir.Value) -> ir.Value | None:
        """The 0/1 tensor of `op`(a, b); None when the profile has no exact form for it."""
        t = a.dtype
        if t is None or t != b.dtype:
            return None
        if t == D.BOOL and op == "Equal":
            sa, sb = self.bool01(a, None), None
            if sa is not None:
                sb = self.bool01(b, sa.dtype)
            if sa is None or sb is None:
                return None
            u = sa.dtype or D.INT64
            st = self.op("Mul", [sa, sb], u)
            xor = self.op("Sub", [self.op("Add", [sa, sb], u), self.op("Add", [st, st], u)], u)
            return self.op("Sub", [self.const(1, u), xor], u)
        if t in FLOATS:
            return self._float_compare(op, a, b, t)
        if t in NARROW_INTS and (a in self.wide or b in self.wide):
            return self._float_compare(op, self.widen(a, D.FLOAT), self.widen(b, D.FLOAT),
                                       D.FLOAT)
        if t in INTS:
            ca, cb = _constant(a), _constant(b)
            if _scalar_like(ca, _rank(b)) and not _scalar_like(cb, _rank(a)):
                a, b, op, ca, cb = b, a, FLIP[op], cb, ca
            if _scalar_like(cb, _rank(a)):
                return self._int_vs_constant(op, a, int(cb.reshape(())), t)
            return self._int_vs_tensor(op, a, b, t)
        return None

    def _sub(self, a: ir.Value, b: ir.Value, t: ir.DataType) -> ir.Value:
        cb = _constant(b)
        if _scalar_like(cb, _rank(a)) and not cb.any():
            return a  # a - 0 is a, -0 included
        return self.op("Sub", [a, b], t)

    def _float_compare(self, op: str, a: ir.Value, b: ir.Value, t: ir.DataType) -> ir.Value:
        one = self.const(1, t)
        if op == "Greater":
            return self.step(self._sub(a, b, t), t)
        if op == "Less":
            return self.step(self._sub(b, a, t), t)
        if op == "GreaterOrEqual":  # not (b > a)
            return self.op("Sub", [one, self.step(self._sub(b, a, t), t)], t)
        if op == "LessOrEqual":
            return self.op("Sub", [one, self.step(self._sub(a, b, t), t)], t)
        diff = self.op("Abs", [self._sub(a, b, t)], t)  # Equal
        return self.op("Sub", [one, self.step(diff, t)], t)

    def _int_vs_constant(self, op: str, a: ir.Value, c: int, t: ir.DataType) -> ir.Value:
        """Clip forms: a is never subtracted from c, so nothing can overflow."""
        info = np.iinfo(t.numpy())
        if t in NO_CLIP:
            a, t = self.cast(a, D.INT32), D.INT32

        def fixed(v: int) -> ir.Value:  # v everywhere: Clip(a, v, v)
            return self.op("Clip", [a, self.const(v, t), self.const(v, t)], t)

        def gt(k: int) -> ir.Value:  # [a > k] = Clip(a, k, k + 1) - k
            if k >= info.max:
                return fixed(0)
            clip = self.op("Clip", [a, self.const(k, t), self.const(k + 1, t)], t)
            return self.op("Sub", [clip, self.const(k, t)], t)

        def lt(k: int) -> ir.Value:  # [a < k] = k - Clip(a, k - 1, k)
            if k <= info.min:
                return fixed(0)
            clip = self.op("Clip", [a, self.const(k - 1, t), self.const(k, t)], t)
            return self.op("Sub", [self.const(k, t), clip], t)

        if op == "Greater":
            return gt(c)
        if op == "Less":
            return lt(c)
        if op == "GreaterOrEqual":
            return gt(c - 1) if c > info.min else fixed(1)
        if op == "LessOrEqual":
            return lt(c + 1) if c < info.max else fixed(1)
        if c >= info.max:  # Equal
            return gt(c - 1)
        if c <= info.min:
            return lt(c + 1)
        return self.op("Sub", [gt(c - 1), gt(c)], t)

    def _int_vs_tensor(self, op: str, a: ir.Value, b: ir.Value, t: ir.DataType) -> ir.Value | None:
        """Both sides widened, so a - b is exact; None for 64-bit tensors (no wider type)."""
        w = WIDER.get(t)
        if w is None:
            return None
        aw, bw = self.cast(a, w), self.cast(b, w)
        zero, one = self.const(0, w), self.const(1, w)

        def pos(d: ir.Value) -> ir.Value:  # [d > 0] for an integer d
            return self.op("Clip", [d, zero, one], w)

        if op == "Greater":
            return pos(self.op("Sub", [aw, bw], w))
        if op == "Less":
            return pos(self.op("Sub", [bw, aw], w))
        if op == "GreaterOrEqual":
            return self.op("Sub", [one, pos(self.op("Sub", [bw, aw], w))], w)
        if op == "LessOrEqual":
            return self.op("Sub", [one, pos(self.op("Sub", [aw, bw], w))], w)
        diff = self.op("Abs", [self.op("Sub", [aw, bw], w)], w)  # Equal
        return self.op("Sub", [one, pos(diff)], w)


def profile_bundle(bundle: str | Path, profile: str) -> list[str]:
    """Put the training graphs of a written bundle (whole step, per-layer) into `profile`
    (same interface, so the manifest's inputs, outputs and bindings stay valid) and rehash
    them; returns the files rewritten. infer.onnx keeps its dynamic batch and is left alone."""
    from export.bundle import MANIFEST, check_bundle, sha256

    check_profile(profile)
    bundle = Path(bundle)
    manifest = check_bundle(bundle)
    if profile == "plain":
        return []
    files, done = dict(manifest.files), []
    for io in (manifest.step, *manifest.layers):
        path = bundle / io.file
        onnx.save(apply_profile(onnx.load(str(path)), profile), path)
        files[io.file] = sha256(path)
        done.append(io.file)
    (bundle / MANIFEST).write_text(manifest.with_(files=files).to_json())
    check_bundle(bundle)
    return done

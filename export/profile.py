"""Operator profiles of exported graphs: `plain` (as traced) and `npu` (what NPU compilers take).

    apply_profile(model, profile) -> model        profile in PROFILES; "plain" returns it as is
    npu_violations(model) -> list[str]            what keeps a graph out of the npu profile

Why: NPU graph compilers (QNN HTP, IREE's embedded targets, vendor toolchains) want static
shapes and plain arithmetic. A comparison whose boolean feeds arithmetic through Cast,
Where or Sign fails QNN HTP's fp32 graph finalisation (QNN_COMMON_ERROR_MEM_ALLOC), and the
max-pool backward of the plain graph (MaxPool's Indices output and a ScatterElements by
them) is not supported by QNN at all and crashes IREE's llvm-cpu code. The npu profile
rewrites exactly those patterns and leaves everything else alone. Its contract:

  interface   the same graph inputs and outputs (names, dtypes, shapes) as the plain graph
  numbers     the same values for finite inputs: every rewrite below is exact in IEEE
              arithmetic with gradual underflow (NaN propagates differently; a step whose
              numbers are NaN is already lost, and training stops on a non-finite loss)
  operators   no Greater / Less / GreaterOrEqual / LessOrEqual / Equal / Not / And / Or /
              Xor / Where / Sign / ScatterElements / Range, no MaxPool Indices output, every
              tensor's shape static (`npu_violations` checks all of it)

The rewrites, in order:
  1. fold     nodes whose inputs are all constants and whose outputs are small (the
              exporter's shape arithmetic, e.g. Equal/Where over an Expand's shape) become
              initializers: static shapes, no comparison left in shape computations
  2. pools    ScatterElements(zeros, Reshape(Transpose(Sub(MaxPool.Indices, base))), U),
              the gradient routed to each 2x2 window's argmax, becomes first-argmax masks:
              eq_k = 1 - Ceil(Clip(Y - x_k, 0, 1)) for the window's four elements x_k
              (Y - x_k >= 0 is 0 exactly when x_k is the max), m_k = eq_k * prod_{j<k}
              (1 - eq_j) (torch's argmax is the first maximum in row-major window order,
              ties included), then U * m_k for the four positions interleaved back to full
              resolution by Concat + DepthToSpace (+ Pad for odd sizes)
  3. booleans every boolean becomes a 0/1 tensor of a numeric type:
              float  a > b  ->  Ceil(Clip(a - b, 0, 1))   (a - b > 0 iff a > b, and
                                Clip/Ceil map (0, 1] to 1 and <= 0 to 0, exactly)
                     a == b ->  1 - Ceil(Clip(Abs(a - b), 0, 1));  <, >=, <= likewise
              integer a > c ->  Clip(a, c, c + 1) - c      for a constant scalar c: no
                                subtraction of a and c, so no overflow anywhere;
                                a < c -> c - Clip(a, c - 1, c); ==, >=, <= from those two
              Not / And / Or / Xor -> 1 - s, s t, s + t - s t, s + t - 2 s t
              Cast(bool -> T) -> the 0/1 tensor (cast if its type is not T)
              Where(s, x, y)  -> s x + (1 - s) y;   Sign(x) -> step(x) - step(-x)
              (integer Sign -> Clip(x, -1, 1))
A pattern the profile does not know is left as it is, and `npu_violations` names it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge.errors import EdgeError

PROFILES = ("plain", "npu")
DEFAULT_PROFILE = "plain"
BOOLEAN_OPS = ("Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "Not", "And",
               "Or", "Xor")
BANNED_OPS = frozenset((*BOOLEAN_OPS, "Where", "Sign", "ScatterElements", "ScatterND",
                        "Range", "NonZero"))
FOLD_MAX_ELEMENTS = 64  # shape arithmetic is a few elements; big splats stay ConstantOfShape
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
_INTS = (TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64,
         TensorProto.UINT8, TensorProto.UINT16, TensorProto.UINT32)


def apply_profile(model: onnx.ModelProto, profile: str) -> onnx.ModelProto:
    """The model in the named operator profile (see the module docstring)."""
    check_profile(profile)
    if profile == "plain":
        return model
    return npu_profile(model)


def check_profile(profile: str) -> None:
    if profile not in PROFILES:
        raise EdgeError(f"unknown operator profile {profile!r}; valid: {', '.join(PROFILES)}")


def npu_profile(model: onnx.ModelProto) -> onnx.ModelProto:
    from export.trace import check_model

    g = _Graph(model)
    g.fold()
    g.rewrite_pools()
    g.rewrite_booleans()
    out = g.build()
    names_in = [i.name for i in model.graph.input]
    names_out = [o.name for o in model.graph.output]
    check_model(out, names_in, names_out)
    return out


def npu_violations(model: onnx.ModelProto) -> list[str]:
    """Every reason the graph is not in the npu profile: banned operators (with counts),
    MaxPool Indices outputs, casts from bool, tensors without a static shape."""
    counts: dict[str, int] = {}
    types = _elem_types(model)
    for n in model.graph.node:
        key = None
        if n.op_type in BANNED_OPS:
            key = n.op_type
        elif n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1]:
            key = "MaxPool with Indices"
        elif n.op_type == "Cast" and types.get(n.input[0]) == TensorProto.BOOL:
            key = "Cast from bool"
        if key:
            counts[key] = counts.get(key, 0) + 1
    out = [f"{k} x{v}" for k, v in sorted(counts.items())]
    dynamic = _dynamic_tensors(model)
    if dynamic:
        out.append(f"dynamic shapes: {', '.join(dynamic[:5])}" + (" ..." if len(dynamic) > 5
                                                                   else ""))
    return out


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = _inferred(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def _dynamic_tensors(model: onnx.ModelProto) -> list[str]:
    g = _inferred(model).graph
    bad = []
    for v in (*g.input, *g.value_info, *g.output):
        t = v.type.tensor_type
        if not t.HasField("shape") or any(not d.HasField("dim_value") for d in t.shape.dim):
            bad.append(v.name)
    return bad


class _Graph:
    """A mutable view of one graph: nodes in topological order, constants by name."""

    def __init__(self, model: onnx.ModelProto):
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.nodes: list[onnx.NodeProto] = list(self.model.graph.node)
        self.consts: dict[str, np.ndarray] = {
            i.name: numpy_helper.to_array(i) for i in self.model.graph.initializer}
        self.inputs = {i.name for i in self.model.graph.input}
        self.outputs = [o.name for o in self.model.graph.output]
        self.types = _elem_types(self.model)
        self._shapes: dict[str, list[int | None]] | None = None
        self._count = 0
        self.alias: dict[str, str] = {}  # a tensor replaced by another of the same value

    # ------------------------------------------------------------------ helpers
    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}__npu{self._count}"

    def const(self, value: Any, elem_type: int) -> str:
        """A scalar (or small array) initializer of the given ONNX element type."""
        arr = np.asarray(value, dtype=helper.tensor_dtype_to_np_dtype(elem_type))
        name = self.fresh("const")
        self.consts[name] = arr
        return name

    def node(self, out: list[onnx.NodeProto], op: str, inputs: list[str], hint: str,
             output: str | None = None, **attrs: Any) -> str:
        name = output or self.fresh(hint)
        out.append(helper.make_node(op, inputs, [name], name=self.fresh(hint + "/" + op),
                                    **attrs))
        return name

    def shapes(self) -> dict[str, list[int | None]]:
        if self._shapes is None:
            g = _inferred(self.build()).graph
            self._shapes = {
                v.name: [d.dim_value if d.HasField("dim_value") else None
                         for d in v.type.tensor_type.shape.dim]
                for v in (*g.value_info, *g.input, *g.output)}
            self._shapes.update({k: list(v.shape) for k, v in self.consts.items()})
        return self._shapes

    def producers(self) -> dict[str, onnx.NodeProto]:
        return {o: n for n in self.nodes for o in n.output if o}

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        out: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                out.setdefault(i, []).append(n)
        return out

    def build(self) -> onnx.ModelProto:
        """The model: live nodes only (reachable from the outputs), used initializers only."""
        for n in self.nodes:
            for k, i in enumerate(n.input):
                while i in self.alias:
                    i = self.alias[i]
                n.input[k] = i
        needed = self._live()
        keep = [n for n in self.nodes if any(o in needed for o in n.output if o)]
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        g = model.graph
        del g.node[:]
        g.node.extend(keep)
        del g.initializer[:]
        g.initializer.extend(numpy_helper.from_array(v, k) for k, v in self.consts.items()
                             if k in needed and k not in self.inputs)
        del g.value_info[:]
        return model

    def _live(self) -> set[str]:
        """Every tensor the graph outputs depend on."""
        needed = set(self.outputs)
        for n in reversed(self.nodes):
            if any(o in needed for o in n.output if o):
                needed.update(i for i in n.input if i)
        return needed

    # ------------------------------------------------------------------ 1. fold
    def fold(self) -> None:
        from onnx.reference import ReferenceEvaluator

        kept = []
        opset = [o for o in self.model.opset_import if o.domain in ("", "ai.onnx")]
        for n in self.nodes:
            ins = [i for i in n.input if i]
            if (n.domain not in ("", "ai.onnx") or n.op_type.startswith("Random")
                    or not ins or any(i not in self.consts or i in self.inputs for i in ins)):
                kept.append(n)
                continue
            graph = helper.make_graph(
                [n], "fold", [], [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None)
                                  for o in n.output if o],
                [numpy_helper.from_array(self.consts[i], i) for i in set(ins)])
            try:
                values = ReferenceEvaluator(helper.make_model(graph, opset_imports=opset)).run(
                    None, {})
            except Exception:  # an op the reference cannot evaluate: leave it to the runtime
                kept.append(n)
                continue
            if any(np.asarray(v).size > FOLD_MAX_ELEMENTS for v in values):
                kept.append(n)
                continue
            for o, v in zip([o for o in n.output if o], values, strict=True):
                self.consts[o] = np.asarray(v)
                self.types[o] = helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype)
        self.nodes = kept
        self._shapes = None

    # ------------------------------------------------------------------ 2. pools
    def rewrite_pools(self) -> None:
        prod = self.producers()
        new: list[onnx.NodeProto] = []
        changed = False
        for n in self.nodes:
            match = self._pool_scatter(n, prod) if n.op_type == "ScatterElements" else None
            if match is None:
                new.append(n)
                continue
            self._emit_pool_backward(new, n, *match)
            changed = True
        if not changed:
            return
        self.nodes = new
        used = self._live()
        for m in self.nodes:  # an Indices output nobody reads any more: a plain MaxPool
            if m.op_type == "MaxPool" and len(m.output) > 1 and m.output[1] not in used:
                del m.output[1:]
        self._shapes = None

    def _pool_scatter(self, n: onnx.NodeProto, prod: dict[str, onnx.NodeProto]) -> Any:
        """(pool node, perm, updates) when `n` routes a 2x2/stride-2 max-pool's gradient to
        its argmax exactly as edge.nets.layer_backward does; None otherwise."""
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if attrs.get("reduction", b"none") not in (b"none", "none"):
            return None
        data, indices, updates = n.input
        zeros = self._constant_value(data, prod)
        shapes = self.shapes()
        dshape = shapes.get(data)
        if zeros is None or np.any(zeros) or not dshape or None in dshape or len(dshape) != 3:
            return None
        if attrs.get("axis", 0) not in (2, -1):
            return None
        reshape = prod.get(indices)
        if reshape is None or reshape.op_type != "Reshape":
            return None
        src = prod.get(reshape.input[0])
        perm = [0, 1, 2, 3]
        if src is not None and src.op_type == "Transpose":
            perm = list(helper.get_attribute_value(src.attribute[0]))
            src = prod.get(src.input[0])
        if perm not in ([0, 1, 2, 3], [1, 0, 2, 3]) or src is None or src.op_type != "Sub":
            return None
        pool = prod.get(src.input[0])
        if pool is None or pool.op_type != "MaxPool" or len(pool.output) < 2:
            return None
        if src.input[0] != pool.output[1] or not _is_2x2_pool(pool):
            return None
        xshape = shapes.get(pool.input[0])
        if not xshape or None in xshape or len(xshape) != 4:
            return None
        nb, c, h, w = xshape
        base = self._constant_value(src.input[1], prod)
        plane = np.arange(nb * c, dtype=np.int64).reshape(nb, c, 1, 1) * (h * w)
        if base is None or not np.array_equal(np.broadcast_to(base, plane.shape), plane):
            return None  # not the per-plane offset: the indices mean something else
        d0, d1 = (nb, c) if perm == [0, 1, 2, 3] else (c, nb)
        ho, wo = h // 2, w // 2
        ushape = shapes.get(updates)
        if dshape != [d0, d1, h * w] or ushape != [d0, d1, ho * wo]:
            return None
        return pool, perm, updates, (nb, c, h, w)

    def _constant_value(self, name: str, prod: dict[str, onnx.NodeProto]) -> np.ndarray | None:
        """The value of a tensor computed from constants only (small cones), else None."""
        if name in self.consts:
            return self.consts[name]
        from onnx.reference import ReferenceEvaluator

        cone, todo, seen = [], [name], set()
        while todo:
            t = todo.pop()
            if t in seen or t in self.consts:
                continue
            seen.add(t)
            p = prod.get(t)
            if p is None or t in self.inputs or len(cone) > 16:
                return None
            cone.append(p)
            todo.extend(i for i in p.input if i)
        order = [m for m in self.nodes if m in cone]
        used = {i for m in order for i in m.input if i in self.consts}
        graph = helper.make_graph(
            order, "cone", [], [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None)],
            [numpy_helper.from_array(self.consts[i], i) for i in used])
        opset = [o for o in self.model.opset_import if o.domain in ("", "ai.onnx")]
        try:
            return np.asarray(ReferenceEvaluator(helper.make_model(graph, opset_imports=opset))
                              .run(None, {})[0])
        except Exception:
            return None

    def _emit_pool_backward(self, out: list[onnx.NodeProto], scatter: onnx.NodeProto,
                            pool: onnx.NodeProto, perm: list[int], updates: str,
                            shape: tuple[int, int, int, int]) -> None:
        nb, c, h, w = shape
        ho, wo = h // 2, w // 2
        x, y, hint = pool.input[0], pool.output[0], scatter.name or "pool"
        ft = self.types.get(x, TensorProto.FLOAT)
        one, zero = self.const(1, ft), self.const(0, ft)
        ends, axes, steps = (self.const([2 * ho, 2 * wo], TensorProto.INT64),
                             self.const([2, 3], TensorProto.INT64),
                             self.const([2, 2], TensorProto.INT64))
        rest, masks = None, []
        for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):  # row-major: torch's argmax order
            xk = self.node(out, "Slice", [x, self.const([i, j], TensorProto.INT64), ends, axes,
                                          steps], hint)
            diff = self.node(out, "Sub", [y, xk], hint)
            step = self.node(out, "Ceil", [self.node(out, "Clip", [diff, zero, one], hint)], hint)
            eq = self.node(out, "Sub", [one, step], hint)  # 1 where x_k is the window's max
            masks.append(eq if rest is None else self.node(out, "Mul", [eq, rest], hint))
            if (i, j) != (1, 1):
                not_eq = step  # 1 - eq
                rest = not_eq if rest is None else self.node(out, "Mul", [rest, not_eq], hint)
        d0, d1 = (nb, c) if perm == [0, 1, 2, 3] else (c, nb)
        u = self.node(out, "Reshape", [updates, self.const([d0, d1, ho, wo], TensorProto.INT64)],
                      hint)
        parts = []
        for m in masks:
            if perm != [0, 1, 2, 3]:
                m = self.node(out, "Transpose", [m], hint, perm=perm)
            parts.append(self.node(out, "Mul", [u, m], hint))
        cat = self.node(out, "Concat", parts, hint, axis=1)
        full = self.node(out, "DepthToSpace", [cat], hint, blocksize=2, mode="DCR")
        if (h, w) != (2 * ho, 2 * wo):  # floor-mode pooling never routes to the odd edge
            pads = self.const([0, 0, 0, 0, 0, 0, h - 2 * ho, w - 2 * wo], TensorProto.INT64)
            full = self.node(out, "Pad", [full, pads], hint)
        self.node(out, "Reshape", [full, self.const([d0, d1, h * w], TensorProto.INT64)], hint,
                  output=scatter.output[0])

    # ------------------------------------------------------------------ 3. booleans
    def rewrite_booleans(self) -> None:
        self.types = _elem_types(self.build())
        self.types.update({k: helper.np_dtype_to_tensor_dtype(v.dtype)
                           for k, v in self.consts.items()})
        num: dict[str, tuple[str, int]] = {}  # bool tensor -> (its 0/1 tensor, numeric type)
        new: list[onnx.NodeProto] = []
        for n in self.nodes:
            if not self._boolean(new, n, num):
                new.append(n)
        self.nodes = new
        self._shapes = None

    def _boolean(self, out: list[onnx.NodeProto], n: onnx.NodeProto,
                 num: dict[str, tuple[str, int]]) -> bool:
        """Emit the arithmetic form of `n` into `out`; False (nothing emitted) if unknown."""
        op, hint = n.op_type, n.name or n.op_type
        if op in ("Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal"):
            made = self._compare(out, op, n.input[0], n.input[1], hint)
            if made is None:
                return False
            num[n.output[0]] = made
            out.append(n)  # the boolean stays until build() finds it dead
            return True
        if op in ("Not", "And", "Or", "Xor"):
            known = [i for i in n.input if i in num]
            types = {num[i][1] for i in known}
            if len(types) != 1 or any(i not in num and i not in self.consts for i in n.input):
                return False
            t = types.pop()
            # a constant boolean operand (folded, e.g. 'divisor < 0'): its 0/1 constant
            s, *rest_ins = [num[i][0] if i in num else
                            self.const(self.consts[i].astype(np.int64), t) for i in n.input]
            one = self.const(1, t)
            if op == "Not":
                r = self.node(out, "Sub", [one, s], hint)
            else:
                v = rest_ins[0]
                st = self.node(out, "Mul", [s, v], hint)
                total = self.node(out, "Add", [s, v], hint)
                if op == "And":
                    r = st
                elif op == "Or":
                    r = self.node(out, "Sub", [total, st], hint)
                else:
                    two_st = self.node(out, "Add", [st, st], hint)
                    r = self.node(out, "Sub", [total, two_st], hint)
            num[n.output[0]] = (r, t)
            out.append(n)
            return True
        if op == "Cast" and n.input[0] in num:
            s, t = num[n.input[0]]
            to = helper.get_attribute_value(n.attribute[0])
            if to == TensorProto.BOOL:
                return False
            if to == t and n.output[0] not in self.outputs:
                self.alias[n.output[0]] = s  # the 0/1 tensor already has the cast's type
            else:
                self.node(out, "Cast", [s], hint, output=n.output[0], to=to)
            return True
        if op == "Where" and n.input[0] in num:
            s, t = num[n.input[0]]
            x, y = n.input[1], n.input[2]
            vt = self.types.get(x)
            if vt is None or vt != self.types.get(y) or vt not in (*_FLOATS, *_INTS):
                return False
            if vt != t:
                s = self.node(out, "Cast", [s], hint, to=vt)
            sx = self.node(out, "Mul", [s, x], hint)
            rest = self.node(out, "Sub", [self.const(1, vt), s], hint)
            ry = self.node(out, "Mul", [rest, y], hint)
            self.node(out, "Add", [sx, ry], hint, output=n.output[0])
            return True
        if op == "Sign":
            t = self.types.get(n.input[0])
            if t in _INTS:
                self.node(out, "Clip", [n.input[0], self.const(-1, t), self.const(1, t)], hint,
                          output=n.output[0])
                return True
            if t not in _FLOATS:
                return False
            pos = self._step(out, n.input[0], t, hint)
            neg = self._step(out, self.node(out, "Neg", [n.input[0]], hint), t, hint)
            self.node(out, "Sub", [pos, neg], hint, output=n.output[0])
            return True
        return False

    def _step(self, out: list[onnx.NodeProto], d: str, t: int, hint: str) -> str:
        """1 where d > 0, else 0, for a float tensor d: Ceil(Clip(d, 0, 1)), exact."""
        clip = self.node(out, "Clip", [d, self.const(0, t), self.const(1, t)], hint)
        return self.node(out, "Ceil", [clip], hint)

    def _compare(self, out: list[onnx.NodeProto], op: str, a: str, b: str,
                 hint: str) -> tuple[str, int] | None:
        t = self.types.get(a)
        if t is None or t != self.types.get(b):
            return None
        if t in _FLOATS:
            return self._compare_float(out, op, a, b, t, hint), t
        if t in _INTS:
            r = self._compare_int(out, op, a, b, t, hint)
            return None if r is None else (r, t)
        return None

    def _sub(self, out: list[onnx.NodeProto], a: str, b: str, hint: str) -> str:
        value = self.consts.get(b)
        if value is not None and value.size and not np.any(value) and value.ndim == 0:
            return a  # a - 0 = a
        return self.node(out, "Sub", [a, b], hint)

    def _compare_float(self, out: list[onnx.NodeProto], op: str, a: str, b: str, t: int,
                       hint: str) -> str:
        one = self.const(1, t)
        if op == "Greater":
            return self._step(out, self._sub(out, a, b, hint), t, hint)
        if op == "Less":
            return self._step(out, self._sub(out, b, a, hint), t, hint)
        if op == "GreaterOrEqual":  # not (b > a)
            return self.node(out, "Sub", [one, self._step(out, self._sub(out, b, a, hint), t,
                                                         hint)], hint)
        if op == "LessOrEqual":
            return self.node(out, "Sub", [one, self._step(out, self._sub(out, a, b, hint), t,
                                                         hint)], hint)
        diff = self.node(out, "Abs", [self._sub(out, a, b, hint)], hint)  # Equal
        return self.node(out, "Sub", [one, self._step(out, diff, t, hint)], hint)

    def _compare_int(self, out: list[onnx.NodeProto], op: str, a: str, b: str, t: int,
                     hint: str) -> str | None:
        flip = {"Greater": "Less", "Less": "Greater", "GreaterOrEqual": "LessOrEqual",
                "LessOrEqual": "GreaterOrEqual", "Equal": "Equal"}
        if a in self.consts and b not in self.consts:
            a, b, op = b, a, flip[op]
        value = self.consts.get(b)
        if value is None or value.size != 1:
            return None  # two tensors: a - b could overflow; leave it
        c = int(value.reshape(()))
        info = np.iinfo(helper.tensor_dtype_to_np_dtype(t))
        if not info.min < c < info.max:
            return None

        def gt() -> str:  # [a > c] = Clip(a, c, c + 1) - c
            clip = self.node(out, "Clip", [a, self.const(c, t), self.const(c + 1, t)], hint)
            return self.node(out, "Sub", [clip, self.const(c, t)], hint)

        def ge() -> str:  # [a >= c] = Clip(a, c - 1, c) - (c - 1)
            clip = self.node(out, "Clip", [a, self.const(c - 1, t), self.const(c, t)], hint)
            return self.node(out, "Sub", [clip, self.const(c - 1, t)], hint)

        one = self.const(1, t)
        if op == "Greater":
            return gt()
        if op == "GreaterOrEqual":
            return ge()
        if op == "Less":
            return self.node(out, "Sub", [one, ge()], hint)
        if op == "LessOrEqual":
            return self.node(out, "Sub", [one, gt()], hint)
        return self.node(out, "Sub", [ge(), gt()], hint)  # Equal


def _is_2x2_pool(node: onnx.NodeProto) -> bool:
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    return (list(a.get("kernel_shape", [])) == [2, 2] and list(a.get("strides", [1, 1])) == [2, 2]
            and not any(a.get("pads", [0] * 4)) and not a.get("ceil_mode", 0)
            and list(a.get("dilations", [1, 1])) == [1, 1] and not a.get("storage_order", 0)
            and math.prod(a.get("kernel_shape", [])) == 4)


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

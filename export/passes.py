"""Graph passes over an exported step: each a ModelProto -> ModelProto with a small contract.

    optimize_graph      the pipeline the exporter runs (below, in order)
    index_pools_to_range
                        the TorchScript exporter turns torch's per-plane max-pool indices
                        into ONNX's flat ones by subtracting each plane's base index, which it
                        reads off a 1x1 MaxPool's Indices output. With static shapes those
                        indices are arange(numel): a Range + Reshape (no initializer, so no
                        flash cost) instead of a slow MaxPool-with-indices kernel per pooling
                        layer and view.
    fold                constant folding with shape inference (static `Shape` chains fold
                        away), dead-node and common-subexpression elimination, constants
                        lifted to initializers (onnxscript / onnx_ir passes; the onnxscript
                        rewriter, `optimizer.optimize`, gives the same graph ~30x slower)
    splats_to_constant_of_shape
                        folded `torch.zeros` buffers are all-equal initializers: stored as a
                        ConstantOfShape of a tiny shape instead (bytes of flash, not N*4)

    onnxruntime_speed   the rewrites `export.runner.Runner` applies before onnxruntime runs a
                        graph (in order below). The exported graph itself stays as traced
                        for every runtime (the npu profile matches its max-pool backward);
                        these change no interface and use standard ai.onnx ops only.
    pool_scatters_to_unpool
                        the max-pool backward (a ScatterElements of the error into zeros at
                        each window's argmax, by the per-plane indices: MaxPool's flat ones
                        minus each plane's base) becomes a MaxUnpool at the same places: no
                        zero buffer to fill, 4-5x faster in onnxruntime; exact
    small_output_convs_to_gemms
                        the conv weight gradient (`edge.nets.layer_backward`: the input
                        convolved by the error, kernel = the whole feature map, output 3x3)
                        becomes one GEMM per output position over a sliced window of the
                        padded input: onnxruntime's Conv runs such map-sized kernels through
                        an im2col with 9 columns (about 2x slower); equal up to rounding
    repeats_to_resize   `repeat_interleave` along an axis (Unsqueeze + Tile + Reshape: the
                        average-pool backward's spreading) becomes one nearest-neighbour
                        Resize, and Resizes in a row one: the same copies, 4-10x faster than
                        onnxruntime's Tile; exact
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
from onnx import helper, numpy_helper

from export.reorder import reorder_for_memory


def optimize_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    return reorder_for_memory(splats_to_constant_of_shape(index_pools_to_range(fold(model))))


def onnxruntime_speed(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exported graph as onnxruntime runs it fastest: same interface, standard ops, the
    same numbers (bit for bit, except the GEMMs' float rounding). Works on a copy."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return repeats_to_resize(small_output_convs_to_gemms(pool_scatters_to_unpool(out)))


def static_shapes(model: onnx.ModelProto, elem_type: int | None = onnx.TensorProto.FLOAT
                  ) -> dict[str, list[int]]:
    """The shape of every tensor of `elem_type` (None: any) whose shape ONNX shape inference
    finds fully static. The rewrites below take float32 tensors only: onnxruntime's Resize,
    MaxUnpool and Gemm kernels do not take every integer type."""
    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        t = v.type.tensor_type
        if elem_type is not None and t.elem_type != elem_type:
            continue
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            out[v.name] = [d.dim_value for d in t.shape.dim]
    out.update({i.name: list(i.dims) for i in model.graph.initializer
                if elem_type is None or i.data_type == elem_type})
    return out


def fold(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnx_ir.passes import common

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = ir.serde.deserialize_model(model)
        onnxscript.optimizer.fold_constants(graph, onnx_shape_inference=True)
        common.RemoveUnusedNodesPass()(graph)
        common.CommonSubexpressionEliminationPass()(graph)
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(graph)
        common.RemoveUnusedNodesPass()(graph)
        return ir.serde.serialize_model(graph)


def _attr(node: onnx.NodeProto, name: str, default: list[int]) -> list[int]:
    for a in node.attribute:
        if a.name == name:
            return list(a.ints)
    return default


def _is_identity_index_pool(node: onnx.NodeProto, used: set[str]) -> bool:
    if node.op_type != "MaxPool" or len(node.output) != 2 or node.output[0] in used:
        return False
    k = _attr(node, "kernel_shape", [])
    ones = [1] * len(k)
    return (k == ones and _attr(node, "strides", ones) == ones
            and not any(_attr(node, "pads", [0] * 2 * len(k)))
            and _attr(node, "storage_order", [0]) in ([0], []))


def index_pools_to_range(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace each 1x1/stride-1 MaxPool read only for its Indices by
    Reshape(Range(0, numel, 1), shape), the same int64 tensor."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None
                       for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.input)}
    nodes, changed = [], False
    for node in model.graph.node:
        shape = shapes.get(node.input[0])
        if not _is_identity_index_pool(node, used) or not shape or None in shape:
            nodes.append(node)
            continue
        base = node.output[1]
        consts = {f"{base}__start": np.array(0, np.int64),
                  f"{base}__limit": np.array(math.prod(shape), np.int64),
                  f"{base}__delta": np.array(1, np.int64),
                  f"{base}__shape": np.array(shape, np.int64)}
        model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
        nodes.append(helper.make_node("Range", list(consts)[:3], [f"{base}__flat"],
                                      name=f"{node.name}__range"))
        nodes.append(helper.make_node("Reshape", [f"{base}__flat", f"{base}__shape"], [base],
                                      name=f"{node.name}__reshape"))
        changed = True
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return model


def splats_to_constant_of_shape(model: onnx.ModelProto, min_size: int = 64) -> onnx.ModelProto:
    keep, nodes = [], []
    graph_inputs = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.size < min_size or init.name in graph_inputs or not (arr == arr.flat[0]).all():
            keep.append(init)
            continue
        shape_name = f"{init.name}__shape"
        keep.append(numpy_helper.from_array(np.array(arr.shape, dtype=np.int64), shape_name))
        value = numpy_helper.from_array(arr.reshape(-1)[:1].copy())
        nodes.append(helper.make_node("ConstantOfShape", [shape_name], [init.name],
                                      name=f"{init.name}__splat", value=value))
    if not nodes:
        return model
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    old = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + old)
    return model


MAX_GEMM_POSITIONS = 9  # output positions a rewritten Conv may have (3x3: the weight gradient)
MIN_GEMM_BATCH = 8  # below this many rows per position, one GEMM over all windows instead


def _is_small_output_conv(node: onnx.NodeProto, shapes: dict[str, list[int]],
                          constants: set[str]) -> bool:
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return False
    x, w, y = (shapes.get(n) for n in (node.input[0], node.input[1], node.output[0]))
    if x is None or w is None or y is None or len(x) != 4 or node.input[1] in constants:
        return False
    attrs = {a.name: a for a in node.attribute}
    if set(attrs) - {"pads", "strides", "dilations", "group", "kernel_shape"}:
        return False  # auto_pad and friends: not this pattern
    plain = (_attr(node, "strides", [1, 1]) == [1, 1]
             and _attr(node, "dilations", [1, 1]) == [1, 1]
             and (attrs["group"].i if "group" in attrs else 1) == 1)
    positions = y[2] * y[3]
    return plain and positions <= MAX_GEMM_POSITIONS and w[2] * w[3] > positions


def small_output_convs_to_gemms(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite each bias-free, group-1, stride-1 Conv with a run-time weight whose output has
    at most MAX_GEMM_POSITIONS positions (and fewer than its kernel has taps) as GEMMs:

        Y[b, o, p, q] = sum_{c,u,v} Xpad[b, c, p+u, q+v] W[o, c, u, v]
                      = (window_pq(Xpad) as (B, C*KH*KW)) @ (W as (O, C*KH*KW))^T

    per position (Slice of the padded input, Gemm transB, then Concat + Reshape to Y), or,
    when B < MIN_GEMM_BATCH, one Gemm over the windows stacked on the batch axis (a small
    im2col: with few rows a per-position GEMM cannot use the machine). The same products,
    summed in another order: equal to the Conv up to float rounding."""
    shapes = static_shapes(model)
    constants = {i.name for i in model.graph.initializer}
    nodes, changed = [], False
    for node in model.graph.node:
        if not _is_small_output_conv(node, shapes, constants):
            nodes.append(node)
            continue
        nodes.extend(_conv_as_gemms(model, node, shapes))
        changed = True
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return model


def _conv_as_gemms(model: onnx.ModelProto, node: onnx.NodeProto,
                   shapes: dict[str, list[int]]) -> list[onnx.NodeProto]:
    x, w, y = node.input[0], node.input[1], node.output[0]
    (b, _, _, _), (o, _, kh, kw), (_, _, oh, ow) = shapes[x], shapes[w], shapes[y]
    pads = _attr(node, "pads", [0, 0, 0, 0])
    base = f"{node.name or y}__gemm"
    consts: dict[str, np.ndarray] = {}

    def const(name: str, value: list[int]) -> str:
        consts[f"{base}_{name}"] = np.array(value, np.int64)
        return f"{base}_{name}"

    out: list[onnx.NodeProto] = []

    def op(op_type: str, inputs: list[str], name: str, **kw_attrs) -> str:
        out.append(helper.make_node(op_type, inputs, [f"{base}_{name}"], name=f"{base}_{name}",
                                    **kw_attrs))
        return f"{base}_{name}"

    xp = x
    if any(pads):
        xp = op("Pad", [x, const("pads", [0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]])],
                "pad")
    wf = op("Reshape", [w, const("wshape", [o, -1])], "w")
    axes = const("axes", [2, 3])
    _, _, h, w_ = shapes[x]

    def window(p: int, q: int) -> str:
        if (p, q, kh, kw) == (pads[0], pads[1], h, w_):
            return x  # the window at the padding's offset is the unpadded input itself
        return op("Slice", [xp, const(f"start{p}{q}", [p, q]),
                            const(f"end{p}{q}", [p + kh, q + kw]), axes], f"win{p}{q}")

    windows = [window(p, q) for p in range(oh) for q in range(ow)]
    if b >= MIN_GEMM_BATCH:  # (B, O) per position, stacked on a last axis: (B, O, positions)
        rows, last = const("rows", [b, -1]), const("last", [2])
        cols = [op("Unsqueeze", [op("Gemm", [op("Reshape", [win, rows], f"flat{i}"), wf],
                                    f"gemm{i}", transB=1), last], f"col{i}")
                for i, win in enumerate(windows)]
        stacked = op("Concat", cols, "cat", axis=2)
    else:  # (positions * B, O) from one GEMM, then positions moved last
        patches = op("Concat", windows, "cat", axis=0) if len(windows) > 1 else windows[0]
        flat = op("Reshape", [patches, const("rows", [len(windows) * b, -1])], "flat")
        g = op("Reshape", [op("Gemm", [flat, wf], "gemm", transB=1),
                           const("split", [len(windows), b, o])], "positions")
        stacked = op("Transpose", [g], "last", perm=[1, 2, 0])
    out.append(helper.make_node("Reshape", [stacked, const("yshape", [b, o, oh, ow])], [y],
                                name=f"{base}_y"))
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    return out


_NEAREST = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
            "nearest_mode": "floor"}  # output[i] = input[floor(i / scale)]: exact for integers


def _const_ints(name: str, inits: dict[str, onnx.TensorProto]) -> list[int] | None:
    t = inits.get(name)
    return None if t is None else [int(v) for v in numpy_helper.to_array(t).reshape(-1)]


def _repeat_interleave(node: onnx.NodeProto, prod: dict[str, onnx.NodeProto],
                       readers: dict[str, int], inits: dict[str, onnx.TensorProto],
                       shapes: dict[str, list[int]]) -> tuple[str, list[float]] | None:
    """(X, Resize scales) when `node` is Reshape(Tile(Unsqueeze(X, a + 1), r at a + 1), X's
    shape with axis a times r): torch's `repeat_interleave(X, r, a)`; None otherwise."""
    if node.op_type != "Reshape":
        return None
    tile = prod.get(node.input[0])
    if tile is None or tile.op_type != "Tile" or readers.get(tile.output[0]) != 1:
        return None
    unsq = prod.get(tile.input[0])
    if unsq is None or unsq.op_type != "Unsqueeze" or readers.get(unsq.output[0]) != 1:
        return None
    x, axes = unsq.input[0], _const_ints(unsq.input[1], inits) if len(unsq.input) > 1 else None
    xshape, reps, yshape = shapes.get(x), _const_ints(tile.input[1], inits), shapes.get(
        node.output[0])
    if axes is None or len(axes) != 1 or xshape is None or reps is None or yshape is None:
        return None
    a = axes[0] - 1 if axes[0] >= 0 else axes[0] + len(xshape)
    if not 0 <= a < len(xshape) or len(reps) != len(xshape) + 1:
        return None
    r = reps[a + 1]
    if any(v != 1 for i, v in enumerate(reps) if i != a + 1) or r < 1:
        return None
    want = list(xshape)
    want[a] *= r
    if yshape != want:
        return None
    return x, [float(r) if i == a else 1.0 for i in range(len(xshape))]


def repeats_to_resize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite each `repeat_interleave` (Reshape(Tile(Unsqueeze(X)))) as Resize(X) in
    nearest/asymmetric/floor mode with an integer scale on that axis; a Resize whose input
    is such a Resize read by it alone takes both scales at once. Exact: the same values
    copied to the same places."""
    prod = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    for o in model.graph.output:
        readers[o.name] = readers.get(o.name, 0) + 1
    inits = {i.name: i for i in model.graph.initializer}
    shapes = static_shapes(model)
    rewritten: dict[str, tuple[str, list[float]]] = {}  # Resize output -> (input, scales)
    dead: set[int] = set()
    for node in model.graph.node:
        match = _repeat_interleave(node, prod, readers, inits, shapes)
        if match is None:
            continue
        x, scales = match
        inner = rewritten.get(x)
        if inner is not None and readers.get(x) == 1:  # fold the Resize before into this one
            dead.add(id(prod[x]))
            x, scales = inner[0], [s * t for s, t in zip(inner[1], scales, strict=True)]
        rewritten[node.output[0]] = (x, scales)
        tile = prod[node.input[0]]
        dead.update({id(tile), id(prod[tile.input[0]])})
    if not rewritten:
        return model
    nodes = []
    for node in model.graph.node:
        if id(node) in dead:
            continue
        if node.output[0] in rewritten and node.op_type == "Reshape":
            x, scales = rewritten[node.output[0]]
            name = f"{node.output[0]}__scales"
            model.graph.initializer.append(numpy_helper.from_array(
                np.array(scales, np.float32), name))
            node = helper.make_node("Resize", [x, "", name], [node.output[0]],
                                    name=f"{node.name}__resize", **_NEAREST)
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return drop_unused_initializers(model)


def drop_unused_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Initializers no node reads and no graph output names (a rewrite's leftovers)."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return model


def _ints_attr(node: onnx.NodeProto, name: str) -> list[int] | None:
    for a in node.attribute:
        if a.name == name:
            return list(a.ints)
    return None


def _is_plane_base(sub: onnx.NodeProto, pool: onnx.NodeProto, prod: dict[str, onnx.NodeProto],
                   inits: dict[str, onnx.TensorProto], shapes: dict[str, list[int]]) -> bool:
    """Whether Sub(pool.Indices, base) makes the indices per-plane: base is the (0, 0) corner
    of arange(numel) shaped like the pool's input (each plane's first flat index), as the
    TorchScript exporter writes it (a 1x1/stride-1 MaxPool's Indices of the same input) or
    `index_pools_to_range` rewrites it (Reshape(Range(0, numel, 1), shape))."""
    sl = prod.get(sub.input[1])
    if sl is None or sl.op_type != "Slice" or len(sl.input) < 4:
        return False
    starts, ends, axes = (_const_ints(n, inits) for n in sl.input[1:4])
    steps = _const_ints(sl.input[4], inits) if len(sl.input) > 4 and sl.input[4] else [1, 1]
    if not (starts == [0, 0] and ends == [1, 1] and axes in ([2, 3], [-2, -1])
            and steps == [1, 1]):
        return False
    src = prod.get(sl.input[0])
    if src is not None and src.op_type == "MaxPool":
        return (_is_identity_index_pool(src, set()) and len(src.output) > 1
                and sl.input[0] == src.output[1] and src.input[0] == pool.input[0])
    xshape = shapes.get(pool.input[0])
    if src is None or src.op_type != "Reshape" or xshape is None:
        return False
    rng = prod.get(src.input[0])
    if rng is None or rng.op_type != "Range" or _const_ints(src.input[1], inits) != xshape:
        return False
    return [_const_ints(n, inits) for n in rng.input] == [[0], [math.prod(xshape)], [1]]


def _pool_scatter(node: onnx.NodeProto, prod: dict[str, onnx.NodeProto],
                  inits: dict[str, onnx.TensorProto], shapes: dict[str, list[int]],
                  ints: dict[str, list[int]]):
    """(pool, per-plane indices (d0, d1, Hp*Wp), perm, (n, c, h, w)) when `node` is
    ScatterElements(zeros, Reshape([Transpose](Sub(MaxPool.Indices, plane base))), U, axis=2)
    for a 2x2/stride-2 pool: `edge.nets.layer_backward`'s max-pool backward; else None."""
    if node.op_type != "ScatterElements" or len(node.input) != 3:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("axis", 0) not in (2, -1) or attrs.get("reduction", b"none") not in (
            b"none", "none"):
        return None
    data, indices, _ = node.input
    zeros = prod.get(data)
    if data in inits:
        if np.any(numpy_helper.to_array(inits[data])):
            return None
    elif zeros is None or zeros.op_type != "ConstantOfShape" or any(
            np.any(numpy_helper.to_array(a.t)) for a in zeros.attribute if a.name == "value"):
        return None
    reshape = prod.get(indices)
    if reshape is None or reshape.op_type != "Reshape":
        return None
    src, perm = prod.get(reshape.input[0]), [0, 1, 2, 3]
    if src is not None and src.op_type == "Transpose":
        perm = _ints_attr(src, "perm")
        src = prod.get(src.input[0])
    if perm not in ([0, 1, 2, 3], [1, 0, 2, 3]) or src is None or src.op_type != "Sub":
        return None
    pool = prod.get(src.input[0])
    if (pool is None or pool.op_type != "MaxPool" or len(pool.output) < 2
            or src.input[0] != pool.output[1] or not _is_2x2_stride2_pool(pool)
            or not _is_plane_base(src, pool, prod, inits, shapes)):
        return None
    xshape = shapes.get(pool.input[0])
    if xshape is None or len(xshape) != 4:
        return None
    n, c, h, w = xshape
    d0, d1 = (n, c) if perm == [0, 1, 2, 3] else (c, n)
    if shapes.get(data) != [d0, d1, h * w] or ints.get(indices) != [d0, d1, (h // 2) * (w // 2)]:
        return None
    return pool, indices, perm, (n, c, h, w)


def _is_2x2_stride2_pool(node: onnx.NodeProto) -> bool:
    attrs = {a.name for a in node.attribute}
    return (_attr(node, "kernel_shape", []) == [2, 2] and _attr(node, "strides", [1, 1]) == [2, 2]
            and not any(_attr(node, "pads", [0] * 4)) and _attr(node, "dilations", [1, 1]) == [1, 1]
            and _attr(node, "storage_order", [0]) in ([0], [])
            and not (attrs - {"kernel_shape", "strides", "pads", "dilations", "storage_order",
                              "ceil_mode"})
            and _attr(node, "ceil_mode", [0]) in ([0], []))


def pool_scatters_to_unpool(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite each max-pool backward ScatterElements (see `_pool_scatter`) as

        Reshape(MaxUnpool(Reshape(U, (d0, d1, Hp, Wp)), r + plane offsets, (d0, d1, H, W)))

    where r are the per-plane indices the scatter used, laid out (d0, d1) = (N, C) or, after
    the transpose, (C, N), and the plane offsets (a*d1 + b)*H*W make them MaxUnpool's flat
    indices into a (d0, d1, H, W) tensor. The same values written to the same places, zeros
    elsewhere: exact."""
    prod = {o: n for n in model.graph.node for o in n.output if o}
    inits = {i.name: i for i in model.graph.initializer}
    shapes, ints = static_shapes(model), static_shapes(model, onnx.TensorProto.INT64)
    nodes, changed = [], False
    for node in model.graph.node:
        match = _pool_scatter(node, prod, inits, shapes, ints)
        if match is None:
            nodes.append(node)
            continue
        _, r, perm, (n, c, h, w) = match
        d0, d1 = (n, c) if perm == [0, 1, 2, 3] else (c, n)
        hp, wp, out = h // 2, w // 2, node.output[0]
        consts = {f"{out}__q": np.array([d0, d1, hp, wp], np.int64),
                  f"{out}__offsets": (np.arange(d0 * d1, dtype=np.int64) * (h * w)).reshape(
                      d0, d1, 1, 1),
                  f"{out}__full": np.array([d0, d1, h, w], np.int64),
                  f"{out}__flat": np.array([d0, d1, h * w], np.int64)}
        model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
        names = [f"{out}__{k}" for k in ("u", "r", "i", "e")]
        nodes += [
            helper.make_node("Reshape", [node.input[2], f"{out}__q"], [names[0]], name=names[0]),
            helper.make_node("Reshape", [r, f"{out}__q"], [names[1]], name=names[1]),
            helper.make_node("Add", [names[1], f"{out}__offsets"], [names[2]], name=names[2]),
            helper.make_node("MaxUnpool", [names[0], names[2], f"{out}__full"], [names[3]],
                             name=names[3], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Reshape", [names[3], f"{out}__flat"], [out], name=f"{out}__y")]
        changed = True
    if not changed:
        return model
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return drop_dead_nodes(model)


def drop_dead_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes none of whose outputs the graph outputs depend on, then unused initializers."""
    needed = {o.name for o in model.graph.output}
    keep = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(reversed(keep))
    return drop_unused_initializers(model)

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

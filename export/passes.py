"""Graph passes of the exporter: each an onnx_ir pass with a small contract, and a ModelProto ->
ModelProto function around it.

    optimize_graph(model)   the pipeline `export.trace` runs: fold, splats_to_constant_of_shape,
                            then `export.reorder.reorder_for_memory`
    fold(model)             FoldPass: constant folding with ONNX shape inference (static
                            `Shape` chains fold away), dead-node and common-subexpression
                            elimination, constants lifted to initializers (onnxscript's folder
                            and onnx_ir's common passes). A ConstantOfShape whose output has
                            fewer than SMALL_CONSTANT elements folds too (onnxscript keeps every
                            ConstantOfShape), so small shape arithmetic built on one, e.g. a Pad's
                            pads, becomes an initializer and the shapes after it static.
    splats_to_constant_of_shape(model, min_size)
                            SplatsToConstantOfShapePass: an initializer of at least `min_size`
                            elements, all equal (a folded `torch.zeros` buffer), becomes a
                            ConstantOfShape of a tiny shape initializer: bytes of flash, not N*4.
                            Initializers that are also graph inputs stay.

Every pass keeps the graph's interface (input and output names, types, shapes) and its
numbers: folding evaluates the same ops on constants (a float op folded on constants is
rounded by the folder's NumPy kernel), a splat is the same tensor.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common

from export.reorder import reorder_for_memory

SMALL_CONSTANT = 64  # elements: below, a constant is an initializer; from here, a splat stays


def optimize_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    model = run_passes(model, FoldPass(), SplatsToConstantOfShapePass())
    return reorder_for_memory(model)


def run_passes(model: onnx.ModelProto, *passes: ir.passes.PassBase) -> onnx.ModelProto:
    """`passes` in order over the onnx_ir form of `model` (which is not modified)."""
    ir_model = ir.serde.deserialize_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ir.passes.PassManager(list(passes))(ir_model)
    return ir.serde.serialize_model(ir_model)


def _small_constant_of_shape(node: ir.Node) -> bool | None:
    """onnxscript's fold policy, plus: fold a ConstantOfShape of few elements."""
    if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx"):
        return None
    shape = node.inputs[0].const_value if node.inputs and node.inputs[0] is not None else None
    return True if shape is not None and np.prod(shape.numpy()) < SMALL_CONSTANT else None


class FoldPass(ir.passes.InPlacePass):
    """Constant folding, dead nodes, common subexpressions, constants as initializers."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import onnxscript.optimizer

        folded = onnxscript.optimizer.fold_constants(
            model, onnx_shape_inference=True, should_fold=_small_constant_of_shape
        )
        result = ir.passes.PassManager(
            [
                common.RemoveUnusedNodesPass(),
                common.CommonSubexpressionEliminationPass(),
                common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                common.RemoveUnusedNodesPass(),
            ]
        )(model)
        return ir.passes.PassResult(model, modified=bool(folded.modified or result.modified))


class SplatsToConstantOfShapePass(ir.passes.InPlacePass):
    """All-equal initializers of at least `min_size` elements as ConstantOfShape nodes."""

    def __init__(self, min_size: int = SMALL_CONSTANT):
        super().__init__()
        self.min_size = min_size

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        splats = []
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if value.is_graph_input() or tensor is None or tensor.size < self.min_size:
                continue
            if tensor.dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED):
                continue
            arr = tensor.numpy()
            if not (arr == arr.flat[0]).all():
                continue
            splats.append(self._splat(graph, value, arr))
        if splats:
            first = graph.node(0) if len(graph) else None
            if first is None:
                graph.extend(splats)
            else:
                graph.insert_before(first, splats)
        return ir.passes.PassResult(model, modified=bool(splats))

    @staticmethod
    def _splat(graph: ir.Graph, value: ir.Value, arr: np.ndarray) -> ir.Node:
        name = value.name
        assert name is not None
        del graph.initializers[name]
        shape = ir.Value(
            name=f"{name}__shape",
            shape=ir.Shape([arr.ndim]),
            type=ir.TensorType(ir.DataType.INT64),
            const_value=ir.tensor(np.array(arr.shape, np.int64)),
        )
        graph.register_initializer(shape)
        out = ir.Value(name=name, shape=value.shape, type=value.type)
        node = ir.node(
            "ConstantOfShape",
            [shape],
            {"value": ir.tensor(arr.reshape(-1)[:1].copy())},
            outputs=[out],
            name=f"{name}__splat",
        )
        value.replace_all_uses_with(out, replace_graph_outputs=True)
        return node


def fold(model: onnx.ModelProto) -> onnx.ModelProto:
    return run_passes(model, FoldPass())


def splats_to_constant_of_shape(
    model: onnx.ModelProto, min_size: int = SMALL_CONSTANT
) -> onnx.ModelProto:
    return run_passes(model, SplatsToConstantOfShapePass(min_size))

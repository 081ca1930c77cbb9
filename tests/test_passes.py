"""export.passes: fold and splats_to_constant_of_shape keep every output bit for bit (graphs
built here and traces of the layer library's adjoints), make the max-pool / conv adjoints'
shapes static, and optimize_graph runs fold -> splats -> reorder."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import export.passes as passes
from edge.layers import TRACED
from edge.layers.conv import Conv
from edge.layers.pool import AvgPool, MaxPool
from export.trace import check_model, export_function

F = TensorProto.FLOAT


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for x, y in zip(_run(a, feeds), _run(b, feeds), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _output_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    g = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    return {
        o.name: [
            d.dim_value if d.HasField("dim_value") else None for d in o.type.tensor_type.shape.dim
        ]
        for o in g.output
    }


def _max_pool_step(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pool = MaxPool(3, stride=2, padding=1)
    y, saved = pool.forward(TRACED, {}, t["x"])
    _, gx = pool.adjoint(TRACED, {}, saved, t["g"], True)
    return {"y": y, "gx": gx}


def _conv_step(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    conv, p = Conv(3, 4, 3, stride=2, padding=1), {"w": t["w"], "b": t["b"]}
    y, saved = conv.forward(TRACED, p, t["x"])
    grads, gx = conv.adjoint(TRACED, p, saved, t["g"], True)
    _, ga = AvgPool(2).adjoint(TRACED, {}, (3, 6, 6), y[:, :3, :3, :3], True)
    return {
        "y": y,
        "gw": grads["w"],
        "gb": grads["b"],
        "gx": gx,
        "ga": ga,
        "zeros": torch.zeros(8, 16) + t["b"].sum(),
    }


def _cases():
    gen = torch.Generator().manual_seed(0)
    pool = {
        "x": torch.randn(2, 3, 7, 6, generator=gen),
        "g": torch.randn(2, 3, 4, 3, generator=gen),
    }
    conv = {
        "x": torch.randn(2, 3, 7, 7, generator=gen),
        "w": torch.randn(4, 3, 3, 3, generator=gen),
        "b": torch.randn(4, generator=gen),
        "g": torch.randn(2, 4, 4, 4, generator=gen),
    }
    return [
        (_max_pool_step, pool, ["y", "gx"]),
        (_conv_step, conv, ["y", "gw", "gb", "gx", "ga", "zeros"]),
    ]


@pytest.fixture(scope="module", params=range(2), ids=["maxpool", "conv"])
def traced(request):
    fn, inputs, outputs = _cases()[request.param]
    raw = export_function(fn, inputs, outputs, optimize=False)
    return raw, {k: v.numpy() for k, v in inputs.items()}, outputs


def test_fold_keeps_outputs_and_makes_shapes_static(traced) -> None:
    """The traced adjoints pad with a pads tensor built from a small ConstantOfShape: folded,
    every output's shape is static; no Constant node is left; the same bits come out."""
    raw, feeds, outputs = traced
    assert None in [d for s in _output_shapes(raw).values() for d in s]  # the case is here
    folded = passes.fold(raw)
    assert "Constant" in _ops(raw) and "Constant" not in _ops(folded)
    assert len(folded.graph.node) < len(raw.graph.node)
    assert all(None not in s for s in _output_shapes(folded).values())
    check_model(folded, list(feeds), outputs)
    _same_outputs(raw, folded, feeds)


def test_optimize_graph_is_fold_splats_reorder(traced, monkeypatch) -> None:
    """The exporter's pipeline: same outputs as the raw trace; the reorder step is looked
    up on the module, so a caller may swap it (benchmarks export the unreordered order)."""
    raw, feeds, outputs = traced
    optimized = passes.optimize_graph(raw)
    check_model(optimized, list(feeds), outputs)
    _same_outputs(raw, optimized, feeds)
    seen = []
    monkeypatch.setattr(passes, "reorder_for_memory", lambda m: seen.append(m) or m)
    unordered = passes.optimize_graph(raw)
    assert len(seen) == 1
    assert unordered == passes.splats_to_constant_of_shape(passes.fold(raw))


def _splat_model(value: np.ndarray, as_input: bool = False) -> onnx.ModelProto:
    init = numpy_helper.from_array(value, "c")
    nodes = [helper.make_node("Add", ["x", "c"], ["y"]), helper.make_node("Identity", ["c"], ["z"])]
    inputs = [helper.make_tensor_value_info("x", F, list(value.shape))]
    if as_input:
        inputs.append(helper.make_tensor_value_info("c", F, list(value.shape)))
    outputs = [helper.make_tensor_value_info(n, F, list(value.shape)) for n in ("y", "z")]
    g = helper.make_graph(nodes, "g", inputs, outputs, [init])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_splat_becomes_constant_of_shape() -> None:
    m = _splat_model(np.full((4, 32), 0.25, np.float32))
    r = passes.splats_to_constant_of_shape(m)
    assert _ops(r) == ["ConstantOfShape", "Add", "Identity"]
    assert [i.name for i in r.graph.initializer] == ["c__shape"]
    assert numpy_helper.to_array(r.graph.initializer[0]).tolist() == [4, 32]
    check_model(r, ["x"], ["y", "z"])
    _same_outputs(m, r, {"x": np.arange(128, dtype=np.float32).reshape(4, 32)})


@pytest.mark.parametrize(
    "value,as_input",
    [
        (np.full((3, 20), 0.5, np.float32), False),  # 60 elements: below SMALL_CONSTANT
        (np.arange(64, dtype=np.float32).reshape(8, 8), False),  # not all equal
        (np.zeros((8, 8), np.float32), True),  # an initializer that is also a graph input
    ],
)
def test_other_initializers_stay(value, as_input) -> None:
    m = _splat_model(value, as_input)
    r = passes.splats_to_constant_of_shape(m)
    assert "ConstantOfShape" not in _ops(r)
    assert [i.name for i in r.graph.initializer] == ["c"]


def test_splat_read_by_the_exported_adjoint() -> None:
    """A folded torch.zeros buffer in a trace: one ConstantOfShape, the same bits."""
    fn, inputs, outputs = _cases()[1]
    folded = passes.fold(export_function(fn, inputs, outputs, optimize=False))
    big = [
        i.name
        for i in folded.graph.initializer
        if np.prod(i.dims) >= passes.SMALL_CONSTANT
        and np.unique(numpy_helper.to_array(i)).size == 1
    ]
    assert big  # the zeros buffer (and maybe more) is there to be rewritten
    r = passes.splats_to_constant_of_shape(folded)
    assert _ops(r).count("ConstantOfShape") == len(big) + _ops(folded).count("ConstantOfShape")
    assert not {i.name for i in r.graph.initializer} & set(big)
    _same_outputs(folded, r, {k: v.numpy() for k, v in inputs.items()})

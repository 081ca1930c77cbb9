"""export.passes speed rewrites (`onnxruntime_speed`): each one's outputs equal the unrewritten
graph's, bit for bit or, for the GEMMs, within 1e-5 relative (the same products summed in
another order), on small graphs built here and on an exported training step; graphs outside a
pass's pattern are left alone."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import export.passes as passes
from edge.nets import LayerSpec, init_params, layer_backward, layer_forward, preset
from edge.optim import OptimConfig
from edge.rules.base import avg_pool_backward
from edge.rules.clapp_pp import ClappPP
from export.trace import check_model, export_function
from export.training_step import training_step

RTOL = 1e-5  # relative L2 per output: float rounding of reordered sums
F = TensorProto.FLOAT


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def conv_graph(b: int, c: int, o: int, h: int, pads=(1, 1, 1, 1), stride: int = 1,
               const_weight: bool = False) -> onnx.ModelProto:
    """Y = Conv(X, W): X (b, c, h, h), W (o, c, h, h): the weight-gradient shape (3x3 out)."""
    attrs = {"pads": list(pads)} | ({"strides": [stride, stride]} if stride != 1 else {})
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    inputs = [helper.make_tensor_value_info("x", F, [b, c, h, h])]
    inits = []
    if const_weight:
        w = np.random.default_rng(1).standard_normal((o, c, h, h)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, "w"))
    else:
        inputs.append(helper.make_tensor_value_info("w", F, [o, c, h, h]))
    oh = (h + pads[0] + pads[2] - h) // stride + 1
    ow = (h + pads[1] + pads[3] - h) // stride + 1
    y = helper.make_tensor_value_info("y", F, [b, o, oh, ow])
    g = helper.make_graph([node], "g", inputs, [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("b,c,o,h", [(16, 4, 8, 6), (3, 5, 8, 6), (1, 2, 3, 4), (8, 3, 16, 5)])
@pytest.mark.parametrize("pads", [(1, 1, 1, 1), (0, 0, 0, 0), (1, 0, 1, 0)])
def test_small_output_conv_equals_conv(b, c, o, h, pads):
    """Both forms (a GEMM per output position for b >= 8, one stacked GEMM below) equal the
    Conv, with symmetric, no and one-sided padding."""
    model = conv_graph(b, c, o, h, pads)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((b, c, h, h)).astype(np.float32),
             "w": rng.standard_normal((o, c, h, h)).astype(np.float32)}
    rewritten = passes.small_output_convs_to_gemms(copy.deepcopy(model))
    assert "Conv" not in _ops(rewritten) and "Gemm" in _ops(rewritten)
    check_model(rewritten, ["x", "w"], ["y"])
    (want,), (got,) = _run(model, feeds), _run(rewritten, feeds)
    assert got.shape == want.shape
    assert _rel(want, got) < RTOL


@pytest.mark.parametrize("kwargs", [{"const_weight": True}, {"stride": 2}])
def test_small_output_conv_leaves_other_convs(kwargs):
    """A constant weight (an ordinary layer's conv, onnxruntime packs it) or a stride is not
    the pattern: the graph is returned as it was."""
    model = conv_graph(16, 4, 8, 6, **kwargs)
    assert passes.small_output_convs_to_gemms(copy.deepcopy(model)) == model


def test_forward_conv_is_not_rewritten():
    """A 3x3 conv with a run-time weight (the layer's forward) has more outputs than taps."""
    x = helper.make_tensor_value_info("x", F, [2, 3, 8, 8])
    w = helper.make_tensor_value_info("w", F, [4, 3, 3, 3])
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])
    y = helper.make_tensor_value_info("y", F, [2, 4, 8, 8])
    g = helper.make_graph([node], "g", [x, w], [y])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    assert passes.small_output_convs_to_gemms(copy.deepcopy(model)) == model


def _traced(fn, inputs: dict[str, torch.Tensor], outputs: list[str]) -> onnx.ModelProto:
    """`fn` exported and folded, none of the speed rewrites applied."""
    return passes.fold(export_function(fn, inputs, outputs, optimize=False))


def _feeds(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in inputs.items()}


@pytest.mark.parametrize("k,shape", [(4, (3, 5, 8, 8)), (3, (2, 4, 9, 6)), (2, (2, 3, 5, 4))])
def test_repeats_become_one_resize_bit_exact(k, shape):
    """The average-pool backward's two repeat_interleaves (cropped cells padded back) become
    one Resize; values bit for bit the same."""
    n, c, h, w = shape
    gp = torch.randn(n, c * (h // k) * (w // k))
    model = _traced(lambda t: {"g": avg_pool_backward(t["gp"], torch.Size(shape), k)},
                    {"gp": gp}, ["g"])
    rewritten = passes.repeats_to_resize(copy.deepcopy(model))
    assert "Tile" in _ops(model) and "Tile" not in _ops(rewritten)
    assert _ops(rewritten).count("Resize") == 1
    check_model(rewritten, ["gp"], ["g"])
    (want,), (got,) = _run(model, _feeds({"gp": gp})), _run(rewritten, _feeds({"gp": gp}))
    assert np.array_equal(want, got)


def test_integer_repeats_are_left_alone():
    """onnxruntime's Resize does not take every integer type: int tensors keep their Tile."""
    x = torch.arange(24, dtype=torch.int32).reshape(2, 3, 4)
    model = _traced(lambda t: {"y": t["x"].repeat_interleave(2, 1)}, {"x": x}, ["y"])
    assert "Tile" in _ops(model)
    assert passes.repeats_to_resize(copy.deepcopy(model)) == model


def _pool_layer_backward(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layer = LayerSpec("conv", t["x"].shape[1], t["w"].shape[0], pool=True)
    out = layer_forward(layer, t["w"], t["b"], t["x"])
    gw, gb = layer_backward(layer, out, t["gy"])  # traced: the ONNX formulation
    return {"gw": gw, "gb": gb}


@pytest.mark.parametrize("h,w", [(8, 8), (7, 6)])
def test_pool_scatter_becomes_unpool_bit_exact(h, w):
    """The traced max-pool backward (odd sizes: floor pooling leaves the last row/column
    out), ties in the windows included (a constant input region), routes the same values:
    the weight and bias gradients are bit for bit the scatter's."""
    x = torch.randn(4, 3, h, w)
    x[:, :, :4, :4] = 0.5  # equal pre-activations in a window: torch takes the first
    inputs = {"x": x, "w": torch.randn(5, 3, 3, 3), "b": torch.rand(5),
              "gy": torch.randn(4, 5, h // 2, w // 2)}
    model = _traced(_pool_layer_backward, inputs, ["gw", "gb"])
    rewritten = passes.pool_scatters_to_unpool(copy.deepcopy(model))
    assert "ScatterElements" in _ops(model)
    assert "ScatterElements" not in _ops(rewritten) and "MaxUnpool" in _ops(rewritten)
    check_model(rewritten, list(inputs), ["gw", "gb"])
    for want, got in zip(_run(model, _feeds(inputs)), _run(rewritten, _feeds(inputs)),
                         strict=True):
        assert np.array_equal(want, got)


def test_scatter_of_other_indices_is_left_alone():
    """A scatter by indices that are not a max-pool's (here: given as an input) stays."""
    data = helper.make_tensor_value_info("d", F, [2, 3, 16])
    idx = helper.make_tensor_value_info("i", TensorProto.INT64, [2, 3, 4])
    upd = helper.make_tensor_value_info("u", F, [2, 3, 4])
    node = helper.make_node("ScatterElements", ["d", "i", "u"], ["y"], axis=2)
    y = helper.make_tensor_value_info("y", F, [2, 3, 16])
    model = helper.make_model(helper.make_graph([node], "g", [data, idx, upd], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    assert passes.pool_scatters_to_unpool(copy.deepcopy(model)) == model


@pytest.fixture(scope="module")
def digits_step():
    net = preset("digits", (1, 8, 8), 0.5)
    rule, opt = ClappPP(), OptimConfig("adamw", lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    params = init_params(net, gen)
    params.update(rule.init(net, gen))
    state = opt.init_state(params)
    return net, rule, opt, params, state


def _step_feeds(model: onnx.ModelProto, step) -> dict[str, np.ndarray]:
    _, _, _, params, state = step
    rng = np.random.default_rng(0)
    feeds = {}
    for i in model.graph.input:
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        if i.name.startswith("params/"):
            feeds[i.name] = params[i.name[len("params/"):]].numpy()
        elif i.name.startswith("state/"):
            feeds[i.name] = state[i.name[len("state/"):]].numpy()
        else:
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("name", ["pool_scatters_to_unpool", "small_output_convs_to_gemms",
                                  "repeats_to_resize", "onnxruntime_speed"])
def test_exported_step_equals_unrewritten(digits_step, name):
    """Each rewrite, and all of them in a row, on the exported CLAPP++ step: every output (new
    parameters, optimizer state, losses) within RTOL of the exported graph's; the interface
    and the standard-ops check unchanged."""
    net, rule, opt, params, state = digits_step
    model = training_step(net, rule, opt, params, state, 8)[0]
    rewritten = getattr(passes, name)(copy.deepcopy(model))
    assert _ops(model) != _ops(rewritten)  # the pass did rewrite something here
    check_model(rewritten, [i.name for i in model.graph.input],
                [o.name for o in model.graph.output])
    feeds = _step_feeds(model, digits_step)
    for a, b in zip(_run(model, feeds), _run(rewritten, feeds), strict=True):
        assert _rel(a, b) < RTOL


def test_onnxruntime_speed_leaves_its_input_alone(digits_step):
    net, rule, opt, params, state = digits_step
    model = training_step(net, rule, opt, params, state, 8)[0]
    before = model.SerializeToString()
    passes.onnxruntime_speed(model)
    assert model.SerializeToString() == before

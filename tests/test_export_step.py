"""The exported training step: a clean standard-ops graph, equal to the torch step.

Parity norm: for every parameter and state tensor, the relative L2 (Frobenius) error
||onnx - torch||_2 / ||torch||_2 after 20 steps from the same start on the same views.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
import torch

from edge import rules
from edge.data import default_views, load, two_views
from edge.errors import EdgeError
from edge.nets import init_params, preset
from edge.optim import OptimConfig
from edge.rules.clapp_pp import ClappPP
from edge.step import local_step
from edge.app.train import TrainConfig, build, initial_params
from export.layers import layer_step_graphs
from export.manifest import NEW_PARAMS, PARAMS, STATE, Manifest
from export.runner import OnnxStepper, Runner, apply_bindings, run_layer_chain
from export.trace import nonstandard_ops, op_counts
from export.training_step import training_step

BATCH, STEPS = 16, 20
FP32_OPS = {
    "Add", "AveragePool", "Cast", "Concat", "ConstantOfShape", "Conv", "Div", "Flatten",
    "Greater", "MatMul", "MaxPool", "Mul", "Pow", "Range", "ReduceSum", "Relu", "Reshape",
    "ScatterElements", "Slice", "Sqrt", "Sub", "Tile", "Transpose", "Unsqueeze",
}


@pytest.fixture(scope="module")
def setup():
    cfg = TrainConfig(width=0.25, batch_size=BATCH)
    net, rule = build(cfg, (1, 8, 8))
    opt = cfg.optim()
    params = initial_params(cfg, net, rule)
    state = opt.init_state(params)
    ds = load("digits")
    gen = torch.Generator().manual_seed(3)
    views = []
    for s in range(STEPS):
        x = ds.x_train[s * BATCH:(s + 1) * BATCH]
        views.append(two_views(x, gen, default_views("digits"), ds.mean, ds.std))
    return net, rule, opt, params, state, views


@pytest.fixture(scope="module")
def step_graph(setup):
    net, rule, opt, params, state, _ = setup
    return training_step(net, rule, opt, params, state, BATCH)


@pytest.fixture(scope="module")
def torch_run(setup):
    """20 torch steps: final params, state and every step's loss. One thread: on a busy
    2-core machine torch's two spinning OpenMP threads can be 50x slower."""
    net, rule, opt, params, state, views = setup
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for x1, x2 in views:
            params, state, m = local_step(net, rule, opt, params, state, x1, x2)
            losses.append(m["layer_loss"])
    finally:
        torch.set_num_threads(threads)
    return params, state, torch.stack(losses)


@pytest.fixture(scope="module")
def layer_graphs(setup):
    net, rule, opt, params, state, _ = setup
    return layer_step_graphs(net, rule, opt, params, state, BATCH)


@pytest.fixture(scope="module")
def tiny():
    """A two-layer MLP: quick to export for the error-path tests."""
    net = preset("mlp", (1, 8, 8), width=0.05)
    rule = ClappPP()
    opt = OptimConfig()
    params = init_params(net, torch.Generator().manual_seed(0))
    params.update(rule.init(net, torch.Generator().manual_seed(1)))
    return net, rule, opt, params, opt.init_state(params)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def worst(p1, s1, p2, s2) -> float:
    return max([rel_err(p2[k], p1[k]) for k in p1] + [rel_err(s2[k], s1[k]) for k in s1])


def run_steps(stepper, setup):
    _, _, _, params, state, views = setup
    losses = []
    for x1, x2 in views:
        params, state, m = stepper(params, state, x1, x2)
        losses.append(m["layer_loss"])
    return params, state, torch.stack(losses)


def test_graph_uses_standard_ops_only_and_passes_the_checker(step_graph):
    model, _ = step_graph
    assert nonstandard_ops(model) == []
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert all(o.version >= 17 for o in model.opset_import)
    onnx.checker.check_model(model, full_check=True)
    assert set(op_counts(model)) <= FP32_OPS, set(op_counts(model)) - FP32_OPS


def test_pool_backward_and_conv_weight_gradient_export_cleanly(step_graph):
    model, _ = step_graph
    g = model.graph
    made = {o for n in g.node for o in n.output}
    # max-pool with its argmax indices (one per pooling layer and view: the exporter's 1x1
    # index pools became Range), and the backward scatter by those indices
    pools = [n for n in g.node if n.op_type == "MaxPool"]
    assert len(pools) == 4 and all(len(n.output) == 2 and n.output[1] for n in pools)
    scatters = [n for n in g.node if n.op_type == "ScatterElements"]
    assert len(scatters) == 4  # 2 pooling layers x 2 views
    # weight gradient as a Conv whose "weights" are the error: computed in the graph, neither
    # an initializer nor a graph input
    convs = [n for n in g.node if n.op_type == "Conv"]
    grad_convs = [n for n in convs if n.input[1] in made]
    assert len(grad_convs) == 6  # 3 layers x 2 views
    forward = [n for n in convs if n.input[1] not in made]
    assert {n.input[1] for n in forward} == {f"params/enc.{i}.w" for i in range(3)}


def test_manifest_names_the_graph_and_binds_every_param(setup, step_graph):
    _, _, _, params, state, _ = setup
    model, manifest = step_graph
    assert [t.name for t in manifest.inputs] == [i.name for i in model.graph.input]
    assert [t.name for t in manifest.outputs] == [o.name for o in model.graph.output]
    assert {i for _, i in manifest.bindings} == {PARAMS + k for k in params} | {
        STATE + k for k in state}
    assert manifest.step.input("x1").shape == (BATCH, 1, 8, 8)
    assert manifest.step.input(PARAMS + "enc.0.w").dtype == "float32"
    assert [t for t in manifest.outputs if t.name == "layer_loss"][0].shape == (3,)
    assert manifest.rule == "clapp++" and manifest.quant is None
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_onnxruntime_matches_torch_for_20_steps(setup, step_graph, torch_run):
    net, rule, opt, *_ = setup
    model, manifest = step_graph
    stepper = OnnxStepper.from_graphs(net, rule, opt, [model], [manifest.step])
    p, s, losses = run_steps(stepper, setup)
    tp, ts, tlosses = torch_run
    assert worst(tp, ts, p, s) < 1e-5
    assert float(s["step"]) == STEPS and s["step"].shape == ()
    np.testing.assert_allclose(losses.numpy(), tlosses.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                    reason="openvino not installed (pip install -e '.[openvino]')")
def test_openvino_matches_torch_for_20_steps(setup, step_graph, torch_run):
    net, rule, opt, *_ = setup
    model, manifest = step_graph
    stepper = OnnxStepper.from_graphs(net, rule, opt, [model], [manifest.step],
                                      runtime="openvino")
    p, s, _ = run_steps(stepper, setup)
    assert worst(*torch_run[:2], p, s) < 1e-4


def test_per_layer_chain_equals_whole_step(setup, step_graph, layer_graphs):
    _, _, _, params, state, views = setup
    model, manifest = step_graph
    models, ios = layer_graphs
    assert [io.file for io in ios] == [f"layers/layer_{i}.onnx" for i in range(3)]
    for m in models:
        assert nonstandard_ops(m) == []
        onnx.checker.check_model(m, full_check=True)
    # the chain's outputs are exactly the whole step's bound outputs
    chain_outs = {o for io in ios for o, _ in io.bindings}
    assert chain_outs == {o for o, _ in manifest.bindings}
    whole = Runner(model)
    layers = [Runner(m) for m in models]
    a = {PARAMS + k: v.numpy() for k, v in params.items()}
    a.update({STATE + k: v.numpy() for k, v in state.items()})
    b = dict(a)
    for x1, x2 in views[:5]:
        outs = whole.run({**a, "x1": x1, "x2": x2})
        apply_bindings(a, outs, manifest.step)
        b, layer_loss = run_layer_chain(layers, ios, b, x1.numpy(), x2.numpy())
        np.testing.assert_allclose(layer_loss, outs["layer_loss"], rtol=1e-6)
    for k in a:
        assert rel_err(torch.from_numpy(b[k]), torch.from_numpy(a[k])) < 1e-6, k


def test_per_layer_stepper_matches_torch(setup, layer_graphs, torch_run):
    net, rule, opt, *_ = setup
    stepper = OnnxStepper.from_graphs(net, rule, opt, *layer_graphs)
    assert stepper.per_layer
    p, s, _ = run_steps(stepper, setup)
    assert worst(*torch_run[:2], p, s) < 1e-5


def test_backprop_baseline_is_refused(setup):
    net, _, opt, params, state, _ = setup
    with pytest.raises(EdgeError, match="global backprop"):
        training_step(net, rules.get("bp-infonce"), opt, params, state, BATCH)


def test_batch_of_one_is_refused(setup):
    net, rule, opt, params, state, _ = setup
    with pytest.raises(EdgeError, match="at least 2"):
        training_step(net, rule, opt, params, state, 1)


class _Svd(ClappPP):
    """A rule using an op ONNX cannot express."""

    name = "svd-test"

    def layer_grads(self, i, layer, o1, o2, params, ctx):
        grads, loss = super().layer_grads(i, layer, o1, o2, params, ctx)
        return grads, loss + torch.linalg.svdvals(o1.y.flatten(1)).sum()


def test_inexpressible_op_is_named(tiny, capfd):
    net, _, opt, params, state = tiny
    rule = _Svd()
    rule.check(net)
    with pytest.raises(EdgeError, match="svdvals"):
        training_step(net, rule, opt, params, state, 4)
    assert "Torch IR graph" not in capfd.readouterr().err


def test_untouched_params_pass_through(tiny):
    """A tensor the rule never updates (a head, say) is still an output, bound to its input
    and returned unchanged."""
    net, rule, opt, params, state = tiny
    params = {**params, "head.w": torch.arange(6.0).view(3, 2)}
    state = {**state, "m.head.w": torch.zeros(3, 2), "v.head.w": torch.zeros(3, 2)}
    model, manifest = training_step(net, rule, opt, params, state, 4)
    assert (NEW_PARAMS + "head.w", PARAMS + "head.w") in manifest.bindings
    stepper = OnnxStepper.from_graphs(net, rule, opt, [model], [manifest.step])
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    p, _, _ = stepper(params, state, x, x.flip(0))
    assert torch.equal(p["head.w"], params["head.w"])


def _integer_case(net, rule, views):
    qc = pytest.importorskip("quant.calibrate")
    from export.integer import integer_program

    rule.check(net)
    gen = torch.Generator().manual_seed(0)
    params = init_params(net, gen)
    params.update(rule.init(net, gen))
    plan, qparams = qc.make_plan(net, rule, params, views)
    return qc, plan, qparams, integer_program(net, rule, plan, qparams), rule


def test_integer_program_is_bit_exact_in_onnxruntime(tiny):
    """Integer mode through the same exporter (a linear net): int stores, int8 views, int32
    noise inputs; every new store equals quant.integer.integer_step's, bit for bit."""
    from export.integer import integer_state
    from export.manifest import NOISE
    from quant.integer import integer_step, make_noise

    net, _, opt, _, _ = tiny
    gen = torch.Generator().manual_seed(2)
    views = [tuple(torch.randn(2, 4, 1, 8, 8, generator=gen)) for _ in range(3)]
    qc, plan, q, program, rule = _integer_case(net, ClappPP(), views)
    state = integer_state()
    model, manifest = training_step(net, rule, opt, q, state, 4, program=program)
    assert nonstandard_ops(model) == [] and manifest.noise == {"low": 0, "high": 1 << 16}
    assert manifest.step.input("x1").dtype == "int8" and manifest.quant["mode"] == "integer"
    assert manifest.quant["plan"]["quant"] == plan.quant
    runner = Runner(model)
    for x1, x2 in views:
        x1q, x2q = (qc.quantize_input(x, plan.f_in) for x in (x1, x2))
        noise = make_noise(plan, q, gen)
        outs = runner.run({**{PARAMS + k: v for k, v in q.items()}, STATE + "step": state["step"],
                           "x1": x1q, "x2": x2q, **{NOISE + k: v for k, v in noise.items()}})
        q, _ = integer_step(net, rule, plan, q, x1q, x2q, noise)
        for k, v in q.items():
            np.testing.assert_array_equal(outs[NEW_PARAMS + k], v.numpy())


INTEGER_OPS = {  # standard integer ops; the only float arithmetic is the loss metric's
    "Abs", "Add", "Cast", "Clip", "Concat", "ConstantOfShape", "ConvInteger", "Div", "Equal",
    "Expand", "Flatten", "Greater", "Less", "MatMulInteger", "Max", "Mod", "Mul", "Neg", "Not",
    "Or", "Pad", "ReduceSum", "Reshape", "Slice", "Sub", "Transpose", "Unsqueeze", "Where",
}
_NARROW = {onnx.TensorProto.INT8: 8, onnx.TensorProto.UINT8: 8, onnx.TensorProto.INT16: 16,
           onnx.TensorProto.INT32: 32, onnx.TensorProto.INT64: 64}


def assert_integer_graph(model: onnx.ModelProto) -> None:
    """ConvInteger / MatMulInteger products, no float Conv or MatMul, every narrowing integer
    Cast fed by a Clip, every integer Div an exact one (of x - Mod(x, d))."""
    ops = op_counts(model)
    assert {"ConvInteger", "MatMulInteger"} <= set(ops) and set(ops) <= INTEGER_OPS, ops
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.value_info, *inferred.input, *inferred.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    made = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        src = made.get(node.input[0]) if node.input else None
        if node.op_type == "Cast":
            to, frm = node.attribute[0].i, types.get(node.input[0])
            if to in _NARROW and frm in _NARROW and _NARROW[to] < _NARROW[frm]:
                assert src is not None and src.op_type == "Clip", node.name
        if node.op_type == "Div" and types.get(node.input[0]) in _NARROW:
            assert src.op_type == "Sub" and made[src.input[1]].op_type == "Mod", node.name


@pytest.fixture(scope="module")
def conv_integer(setup):
    """The digits conv net (x0.25) in int8-w16 integer mode: plan, stores, whole-step graph."""
    from export.integer import integer_state

    net, _, opt, _, _, views = setup
    qc, plan, q, program, rule = _integer_case(net, ClappPP(), views[:2])
    model, manifest = training_step(net, rule, opt, q, integer_state(), BATCH, program=program)
    return qc, plan, q, program, rule, model, manifest


def _integer_feeds(qc, plan, q, gen, x1, x2):
    from export.manifest import NOISE
    from quant.integer import make_noise

    x1q, x2q = (qc.quantize_input(x, plan.f_in) for x in (x1, x2))
    noise = make_noise(plan, q, gen)
    feeds = {"x1": x1q.numpy(), "x2": x2q.numpy()}
    feeds.update({NOISE + k: v.numpy() for k, v in noise.items()})
    return x1q, x2q, noise, feeds


def test_integer_conv_step_is_bit_identical_in_onnxruntime_for_20_steps(setup, conv_integer):
    """Conv net, 20 steps: onnxruntime's integer graph and the torch integer step end with
    the same integer stores (weights_digest equal), the same losses and clip counts."""
    from edge.checkpoint import weights_digest
    from export.integer import integer_state
    from quant.integer import integer_step

    net, *_, views = setup
    qc, plan, q, _, rule, model, manifest = conv_integer
    assert_integer_graph(model)
    runner = Runner(model)
    carried = {PARAMS + k: v.numpy() for k, v in q.items()}
    carried[STATE + "step"] = integer_state()["step"].numpy()
    gen = torch.Generator().manual_seed(5)
    for x1, x2 in views:
        x1q, x2q, noise, feeds = _integer_feeds(qc, plan, q, gen, x1, x2)
        outs = runner.run({**carried, **feeds})
        apply_bindings(carried, outs, manifest.step)
        q, m = integer_step(net, rule, plan, q, x1q, x2q, noise)
        np.testing.assert_array_equal(outs["layer_loss"], m["layer_loss"].numpy())
        assert int(outs["clipped"]) == int(m["clipped"])
    onnx_stores = {k: torch.from_numpy(carried[PARAMS + k]) for k in q}
    assert weights_digest(onnx_stores) == weights_digest(q)
    assert float(carried[STATE + "step"]) == STEPS


def test_integer_per_layer_chain_is_bit_identical_to_the_whole_step(setup, conv_integer):
    """One integer graph per layer, chained (uint8 y -> next x): the same stores as the
    whole-step graph, bit for bit, and integer ops only."""
    from export.integer import integer_state

    net, _, opt, *_ = setup
    qc, plan, q, program, rule, model, manifest = conv_integer
    models, ios = layer_step_graphs(net, rule, opt, q, integer_state(), BATCH, program=program)
    assert [io.input("x1").dtype for io in ios] == ["int8", "uint8", "uint8"]
    assert {o for io in ios for o, _ in io.bindings} == {o for o, _ in manifest.bindings}
    for m in models:
        assert nonstandard_ops(m) == [] and "ConvInteger" in op_counts(m)
    whole, layers = Runner(model), [Runner(m) for m in models]
    a = {PARAMS + k: v.numpy() for k, v in q.items()}
    a[STATE + "step"] = integer_state()["step"].numpy()
    b = dict(a)
    gen = torch.Generator().manual_seed(6)
    for x1, x2 in setup[5][:4]:
        *_, feeds = _integer_feeds(qc, plan, q, gen, x1, x2)
        outs = whole.run({**a, **feeds})
        apply_bindings(a, outs, manifest.step)
        noise = {k: v for k, v in feeds.items() if k.startswith("noise/")}
        b, layer_loss = run_layer_chain(layers, ios, b, feeds["x1"], feeds["x2"], noise)
        np.testing.assert_array_equal(layer_loss, outs["layer_loss"])
    for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def test_integer_per_layer_graphs_need_a_layer_local_context(setup):
    """clapp++dfb scores against the top layer's code: no per-layer integer graphs."""
    from export.integer import integer_state

    net, _, opt, _, _, views = setup
    _, _, q, program, rule = _integer_case(net, rules.get("clapp++dfb"), views[:1])
    assert program.layer is None
    with pytest.raises(EdgeError, match="whole-network context"):
        layer_step_graphs(net, rule, opt, q, integer_state(), BATCH, program=program)

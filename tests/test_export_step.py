"""The exported training step of every preset equals the torch step over 20 steps.

fp32: the graph is the trace of the same `local_step` over the traced executor. At each of
20 steps along the torch trajectory (SGD) the graph gets torch's current parameters and
state, and its update must agree with torch's: over all parameters together, the relative L2
error of the update ||d_onnx - d_torch|| / ||d_torch|| (d = new - old) below FP32_TOL, and
the same for the optimizer state. (Per tensor the relative error is meaningless for a bias
whose gradient is a sum that cancels to nearly nothing.) (Comparing two free-running
trajectories instead would test chaos: a hinge margin within float rounding of zero flips
its modulator, and the runs part. AdamW likewise turns rounding in near-zero gradients into
whole steps.) Integer: bit for bit, two free-running trajectories of 20 steps, whole step
and per-block chain.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge import rules
from edge.nets import fold_batchnorm, preset
from edge.optim import OptimConfig
from edge.step import train_step
from export.manifest import NEW_PARAMS
from export.runner import OnnxStepper
from export.step import block_graphs, fp32_program, integer_program, step_graph
from export.trace import nonstandard_ops
from quant.calibrate import make_plan
from quant.integer import integer_step, make_noise, noise_shapes, quantize_input

STEPS, BATCH = 20, 4
FP32_TOL = 1e-4  # relative L2 of one step's update: float32 summation order only
PRESETS = [
    ("digits", (1, 8, 8), 0.25, "clapp++"),
    ("mnist", (1, 16, 16), 0.25, "clapp"),
    ("mlp", (1, 8, 8), 0.25, "clapp++"),
    ("vgg6", (3, 16, 16), 0.0625, "clapp++dfb"),
    ("resnet8", (3, 16, 16), 0.25, "clapp++"),
    ("dscnn", (1, 20, 10), 0.25, "clapp++both"),
    pytest.param("mobilenetv1-0.25", (3, 32, 32), 0.5, "clapp++", marks=pytest.mark.slow),
    pytest.param("mobilenetv2-0.35", (3, 32, 32), 0.25, "clapp++", marks=pytest.mark.slow),
]


def build(name, shape, width, rule_name, seed=0):
    net = preset(name, shape, width)
    rule = rules.get(rule_name)
    gen = torch.Generator().manual_seed(seed)
    params = net.init_params(gen)
    net, params = fold_batchnorm(net, params)
    rule.check(net)
    params.update(rule.init(net, gen))
    gen = torch.Generator().manual_seed(seed + 1)
    views = []
    for _ in range(STEPS):
        x1 = torch.randn(BATCH, *shape, generator=gen)
        views.append((x1, x1 + 0.3 * torch.randn(x1.shape, generator=gen)))
    return net, rule, params, views


def update_error(old, got, want) -> float:
    """||(got - old) - (want - old)|| / ||want - old|| over all tensors together."""
    keys = [k for k in want if k != "step"]
    d_got = torch.cat([(torch.as_tensor(np.asarray(got[k])) - old[k]).double().flatten()
                       for k in keys])
    d_want = torch.cat([(want[k] - old[k]).double().flatten() for k in keys])
    return float((d_got - d_want).norm() / d_want.norm().clamp_min(1e-30))


def rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("name,shape,width,rule_name", PRESETS)
def test_fp32_step_of_every_preset_matches_torch(name, shape, width, rule_name) -> None:
    net, rule, params, views = build(name, shape, width, rule_name)
    opt = OptimConfig("sgd", lr=1e-3)
    state = opt.init_state(params)
    model, manifest = step_graph(net, rule, fp32_program(net, rule, opt), params, state, BATCH)
    assert nonstandard_ops(model) == []
    stepper = OnnxStepper.from_graphs(net, rule, opt, [model], [manifest.step])
    p_t, s_t = params, state
    for x1, x2 in views:
        p_o, s_o, m_o = stepper(p_t, s_t, x1, x2)
        p_n, s_n, m_t = train_step(net, rule, opt, p_t, s_t, x1, x2)
        assert all(bool(torch.isfinite(v).all()) for v in p_n.values())
        assert update_error(p_t, p_o, p_n) < FP32_TOL
        assert update_error(s_t, s_o, s_n) < FP32_TOL
        assert float(m_o["loss"]) == pytest.approx(float(m_t["loss"]), rel=1e-5)
        p_t, s_t = p_n, s_n
    moved = sum(rel(p_t[k], params[k]) for k in p_t if k.startswith("enc."))
    assert moved > 1e-3  # training moved the weights: the comparison could fail


@pytest.mark.parametrize("name,shape,width,rule_name", PRESETS)
def test_integer_step_of_every_preset_is_bit_exact(name, shape, width, rule_name) -> None:
    net, rule, params, views = build(name, shape, width, rule_name)
    plan, stores = make_plan(net, rule, params, views[:2], "int8-w16", 1e-3)
    form = rule.integer_form(net)
    program = integer_program(net, rule, plan, stores)
    model, manifest = step_graph(net, rule, program, stores,
                                 {"step": torch.zeros((), dtype=torch.int64)}, BATCH)
    assert nonstandard_ops(model) == []
    stepper = OnnxStepper.from_graphs(net, rule, None, [model], [manifest.step],
                                      program=program)
    shapes, gen = noise_shapes(net, form, plan, stores), torch.Generator().manual_seed(5)
    q_t, q_o, count = stores, stores, torch.zeros((), dtype=torch.int64)
    for x1, x2 in views:
        q1, q2 = quantize_input(x1, plan.f_in), quantize_input(x2, plan.f_in)
        noise = make_noise(shapes, gen)
        q_t, m_t = integer_step(net, form, plan, q_t, q1, q2, noise, count)
        q_o, s_o, m_o = stepper(q_o, {"step": count}, q1, q2, noise=noise)
        count = count + 1
        assert int(s_o["step"]) == int(count)
    for k in q_t:
        assert torch.equal(q_o[k], q_t[k]), k
    assert float(m_o["loss"]) == float(m_t["loss"])
    assert any(not torch.equal(q_t[k], stores[k]) for k in stores)  # the stores moved


@pytest.mark.parametrize("quant", ["fp32", "int8-w16"])
@pytest.mark.parametrize("name,shape,width,rule_name", [
    ("digits", (1, 8, 8), 0.25, "clapp++"), ("resnet8", (3, 16, 16), 0.25, "clapp"),
    ("mlp", (1, 8, 8), 0.25, "ff")])
def test_per_block_chain_equals_the_whole_step(name, shape, width, rule_name, quant) -> None:
    if quant != "fp32" and rule_name == "ff":
        pytest.skip("ff has no integer form")
    net, rule, params, views = build(name, shape, width, rule_name)
    if quant == "fp32":
        opt = OptimConfig("adamw", lr=1e-3)
        program, state = fp32_program(net, rule, opt), opt.init_state(params)
    else:
        plan, params = make_plan(net, rule, params, views[:2], quant, 1e-3)
        program, state = integer_program(net, rule, plan, params), {
            "step": torch.zeros((), dtype=torch.int64)}
    whole, manifest = step_graph(net, rule, program, params, state, BATCH)
    models, ios = block_graphs(net, rule, program, params, state, BATCH)
    assert len(models) == len(net.blocks)
    a = OnnxStepper.from_graphs(net, rule, None, [whole], [manifest.step], program=program)
    b = OnnxStepper.from_graphs(net, rule, None, models, ios, program=program)
    noise = {t.name.split("/", 1)[1]: torch.randint(0, 1 << 16, t.shape, dtype=torch.int32,
                                                    generator=torch.Generator().manual_seed(1))
             for t in program.noise}
    x1, x2 = views[0]
    if quant != "fp32":
        x1, x2 = quantize_input(x1, plan.f_in), quantize_input(x2, plan.f_in)
    pa, sa, ma = a(params, state, x1, x2, noise=noise)
    pb, sb, mb = b(params, state, x1, x2, noise=noise)
    for k in pa:
        if quant == "fp32":
            assert rel(pb[k], pa[k]) < 1e-6, k
        else:
            assert torch.equal(pb[k], pa[k]), k
    assert torch.allclose(ma["layer_loss"], mb["layer_loss"], rtol=1e-6)
    # every new_* output of the whole step is some block graph's output, with its shape
    block_out = {t.name: t for io in ios for t in io.outputs}
    for t in manifest.step.outputs:
        if t.name.startswith(NEW_PARAMS):
            assert block_out[t.name].shape == t.shape


def test_rules_with_a_whole_network_context_have_no_block_graphs() -> None:
    from edge.errors import EdgeError

    net, rule, params, _ = build("digits", (1, 8, 8), 0.25, "clapp++dfb")
    opt = OptimConfig()
    with pytest.raises(EdgeError, match="whole-network context"):
        block_graphs(net, rule, fp32_program(net, rule, opt), params, opt.init_state(params),
                     BATCH)


def test_backprop_baselines_do_not_export() -> None:
    from edge.errors import EdgeError

    net = preset("digits", (1, 8, 8), 0.25)
    with pytest.raises(EdgeError, match="global backprop"):
        fp32_program(net, rules.get("bp-infonce"), OptimConfig())

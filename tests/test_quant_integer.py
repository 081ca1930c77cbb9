"""The integer step: bit-exact against the NumPy reference, saturation, bounds, semantics."""

import dataclasses

import numpy as np
import pytest
import torch

from edge.errors import EdgeError
from edge.nets import LayerSpec, NetSpec, init_params, layer_forward, mlp, vgg
from edge.rules import get
from quant.calibrate import make_plan, quantize_input
from quant.clapp_int import integer_form
from quant.integer import apply_update, int_layer_forward, integer_step, layer_weights, make_noise
from quant.intops import INT32_MAX, INT32_MIN
from quant.plan import check_accumulator, dequantize_param
from quant.qat import fake_quant_input, fake_quant_output, fake_quant_params
from quant.reference import reference_step


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    yield
    torch.set_num_threads(n)


N = 6


def _setup(net, rule, quant, seed=0):
    rule.check(net)
    g = torch.Generator().manual_seed(seed)
    params = init_params(net, g)
    params.update(rule.init(net, g))
    views = [tuple(torch.randn(N, *net.in_shape, generator=g) for _ in range(2)) for _ in range(2)]
    plan, qp = make_plan(net, rule, params, views, quant)
    return plan, qp, g, params, views


def _run_both(net, rule, plan, qp, g, steps, all_move=True):
    ref = {k: v.numpy() for k, v in qp.items()}
    start = {k: v.clone() for k, v in qp.items()}
    for _ in range(steps):
        x1, x2 = (torch.randn(N, *net.in_shape, generator=g) for _ in range(2))
        q1, q2 = quantize_input(x1, plan.f_in), quantize_input(x2, plan.f_in)
        noise = make_noise(plan, qp, g)
        qp, metrics = integer_step(net, rule, plan, qp, q1, q2, noise)
        ref, losses = reference_step(
            net, plan, ref, q1.numpy(), q2.numpy(), {k: v.numpy() for k, v in noise.items()}
        )
        for k in qp:
            assert qp[k].dtype == torch.from_numpy(ref[k]).dtype, k
            assert np.array_equal(qp[k].numpy(), ref[k]), f"{k} differs from the reference"
        two_n = 2 * N
        for i, lp in enumerate(plan.layers):
            e = lp.f_y + lp.f_q
            thr = 2**e if e >= 0 else 1
            assert float(metrics["layer_loss"][i]) == pytest.approx(losses[i] / (thr * two_n))
    moved = [k for k in qp if not torch.equal(qp[k], start[k])]
    # int8 stores move by whole int8 steps, rarely in a few steps: ask for most of them
    assert len(moved) >= (len(qp) if all_move else len(qp) // 2), set(qp) - set(moved)
    return qp


CASES = [
    ("clapp++", {"rank": 5}, vgg([4, 6, 8], [2, 3], (3, 8, 8))),  # full + low-rank predictors
    ("clapp++", {"predictor": "full"}, vgg([4, 6, 5], [1, 3], (2, 9, 7))),  # odd maps, crops
    ("clapp++", {}, mlp([10, 6], (1, 4, 4))),  # linear layers
    ("clapp", {}, vgg([4, 6, 8], [2, 3], (3, 8, 8))),
    ("clapp++dfb", {"rank": 4}, vgg([4, 6, 8], [2, 3], (3, 8, 8))),
    ("clapp++both", {"rank": 4}, vgg([4, 6, 8], [2, 3], (3, 8, 8))),
]


@pytest.mark.parametrize("quant", ["int8", "int8-w16"])
@pytest.mark.parametrize("name, hp, net", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_integer_step_equals_numpy_reference_bit_for_bit(name, hp, net, quant):
    rule = get(name, **hp)
    plan, qp, g, _, _ = _setup(net, rule, quant)
    _run_both(net, rule, plan, qp, g, steps=3, all_move=quant == "int8-w16")


def test_every_local_rule_with_an_integer_form_is_covered():
    from edge.rules import describe

    covered = {c[0] for c in CASES}
    for r in describe():
        if not r["local"]:
            continue
        rule = get(r["name"])
        try:
            integer_form(rule)
        except EdgeError:
            continue
        assert r["name"] in covered, f"{r['name']} has an integer form but no bit-exact test"


def test_rule_without_integer_form_is_an_edge_error():
    net = vgg([4, 6], [2], (1, 8, 8))
    rule = get("ff")
    with pytest.raises(EdgeError, match="no integer form.*qat") as e:
        make_plan(net, rule, init_params(net, torch.Generator()), [(torch.randn(4, 1, 8, 8),) * 2])
    assert "\n" not in str(e.value)


def test_weights_saturate_at_their_limits_without_wrapping():
    """Updates that push stores past int8 +-127 or the int16 limits clip there; they never
    wrap, whatever the update size."""
    net = vgg([4, 6, 8], [2, 3], (3, 8, 8))
    for quant, (lo, hi) in (("int8", (-127, 127)), ("int8-w16", (-32512, 32767))):
        plan, qp, g, _, _ = _setup(net, get("clapp++", rank=5), quant)
        pp = plan.params["enc.1.w"]
        assert (pp.lo, pp.hi) == (lo, hi)
        store = torch.tensor([lo, lo + 1, hi - 1, hi, 0], dtype=qp["enc.1.w"].dtype)
        grad = torch.tensor([INT32_MAX, INT32_MAX, INT32_MIN, INT32_MIN, 0])  # pushes outward
        pp = dataclasses.replace(pp, lr_shift=-8)  # a huge step: 2^39 units
        new, clipped = apply_update(pp, store, grad, torch.zeros(5))
        assert new.dtype == store.dtype
        assert new.tolist() == [lo, lo, hi, hi, 0] and int(clipped) == 4
        # the forward reads the top 8 bits: still inside int8 [-127, 127]
        fwd = dequantize_param(new, plan.params["enc.1.w"]) * 2.0 ** plan.layers[1].f_w
        assert fwd.abs().max() <= 127


def test_accumulators_near_int32_saturate_instead_of_wrapping():
    """The Hebbian sums can exceed 2^31 (they sum over batch and positions): they saturate."""
    from quant.integer import IntLayerOut, int_layer_backward

    layer = LayerSpec("linear", 3, 2)
    n = 70_000  # 70000 x 255 x 127 > 2^31
    x = torch.full((n, 3), 255, dtype=torch.uint8)
    y = torch.ones((n, 2), dtype=torch.uint8)
    e = torch.tensor([[127, -127]]).repeat(n, 1)
    gw, gb = int_layer_backward(layer, IntLayerOut(x, y, None, None), e)
    assert gw[0].tolist() == [INT32_MAX] * 3 and gw[1].tolist() == [INT32_MIN] * 3
    assert gb.tolist() == [n * 127, -n * 127]  # in range: exact
    assert gw.to(torch.int32).tolist() == gw.tolist()


def test_forward_overflow_is_an_edge_error():
    assert check_accumulator(9 * 64, 255, 127, "ok") < 2**31
    with pytest.raises(EdgeError, match="overflows the int32 accumulator") as e:
        check_accumulator(70_000, 255, 127, "layer 3 forward")
    assert "\n" not in str(e.value) and "layer 3" in str(e.value)
    # a whole network: 2 x 300 x 300 int8 inputs x int8 weights reach 2^31 (checked up front)
    net = NetSpec("wide", (2, 300, 300), (LayerSpec("linear", 180_000, 2),))
    params = {
        "enc.0.w": torch.randn(2, 180_000),
        "enc.0.b": torch.zeros(2),
        "rule.0.B": torch.eye(2),
    }
    with pytest.raises(EdgeError, match="layer 0 forward"):
        make_plan(net, get("clapp++"), params, [(torch.randn(2, 2, 300, 300),) * 2])
    # a conv layer: 9 x 7400 uint8 inputs of layer 1 (the check runs before any forward)
    net = NetSpec("wide-conv", (1, 2, 2), (LayerSpec("conv", 1, 7400), LayerSpec("conv", 7400, 2)))
    with pytest.raises(EdgeError, match="layer 1 forward: 66600 inputs") as e:
        make_plan(net, get("clapp++"), {}, [(torch.randn(2, 1, 2, 2),) * 2])
    assert "\n" not in str(e.value)
    # the hinge: a code of 70000 values scored through a low-rank predictor
    net = NetSpec("wide-code", (1, 2, 2), (LayerSpec("linear", 4, 70_000),))
    g = torch.Generator().manual_seed(0)
    params = {
        "enc.0.w": torch.randn(70_000, 4, generator=g),
        "enc.0.b": torch.zeros(70_000),
        "rule.0.U": torch.randn(70_000, 4, generator=g),
        "rule.0.V": torch.randn(70_000, 4),
    }
    with pytest.raises(EdgeError, match="rule.0.U products: 70000 inputs .* overflows") as e:
        make_plan(net, get("clapp++", rank=4), params, [(torch.randn(2, 1, 2, 2),) * 2])
    assert "\n" not in str(e.value)


def test_integer_gradients_match_the_float_rule_on_the_quantized_forward():
    """Dequantized, the integer gradients approximate the float closed form evaluated on the
    same quantized forward (QAT's gradients): the integer arithmetic computes the rule.
    (They differ by the int8 predictions, the rounded codes and the stochastic rounding of
    the error; bias gradients, sums over every position, are the noisiest.)"""
    net = vgg([6, 8], [2], (2, 8, 8))
    rule = get("clapp++", predictor="full")
    plan, qp, g, params, views = _setup(net, rule, "int8-w16", seed=3)
    form = integer_form(rule)
    fq = fake_quant_params(
        plan, {**params, **{k: dequantize_param(v, plan.params[k]) for k, v in qp.items()}}
    )
    x1, x2 = views[0]
    q = torch.cat((quantize_input(x1, plan.f_in), quantize_input(x2, plan.f_in)))
    f1, f2 = fake_quant_input(plan, x1), fake_quant_input(plan, x2)
    for i, layer in enumerate(net.layers):
        w, b = layer_weights(plan, qp, i)
        out = int_layer_forward(layer, plan.layers[i], w, b, q)
        noise = make_noise(plan, qp, g)[f"err.{i}.z"]
        grads, loss = form.layer_grads(i, layer, plan, out, qp, None, noise)
        o1 = layer_forward(layer, fq[f"enc.{i}.w"], fq[f"enc.{i}.b"], f1)
        o2 = layer_forward(layer, fq[f"enc.{i}.w"], fq[f"enc.{i}.b"], f2)
        o1 = dataclasses.replace(o1, y=fake_quant_output(o1.y, plan.layers[i].f_y))
        o2 = dataclasses.replace(o2, y=fake_quant_output(o2.y, plan.layers[i].f_y))
        ref, ref_loss = rule.layer_grads(i, layer, o1, o2, fq, None)
        assert float(loss) == pytest.approx(float(ref_loss), rel=0.05)
        for k, r in ref.items():
            got = grads[k].double() * plan.params[k].grad_scale
            cos = torch.nn.functional.cosine_similarity(got.flatten(), r.double().flatten(), 0)
            if k.endswith(".b"):  # a sum over every position: cancellation, rounding noise
                assert cos > 0.5, f"layer {i} {k}: cosine {float(cos):.3f}"
                continue
            assert cos > 0.97, f"layer {i} {k}: cosine {float(cos):.3f}"
            assert float(got.norm() / r.norm()) == pytest.approx(1.0, rel=0.2), k
        q = out.y
        f1, f2 = o1.y, o2.y


def test_noise_makes_steps_reproducible_and_matters():
    net = vgg([4, 6], [2], (1, 8, 8))
    rule = get("clapp++", predictor="full")
    plan, qp, _, _, views = _setup(net, rule, "int8")
    q1, q2 = (quantize_input(v, plan.f_in) for v in views[0])
    runs = []
    for seed in (5, 5, 6):
        noise = make_noise(plan, qp, torch.Generator().manual_seed(seed))
        runs.append(integer_step(net, rule, plan, qp, q1, q2, noise)[0])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in qp)
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in qp)


def test_forward_accumulator_at_the_int32_limit_is_exact():
    """Weights at +-127, inputs at 255 and the bias at its planned limit (int8 mode: the
    whole rest of the int32 range) put the accumulator at 2^31 - 1: pooling and
    requantization stay exact (equal to the int64 reference), nothing wraps."""
    from quant.reference import layer as ref_layer

    net = vgg([4, 6], [2], (3, 8, 8))
    plan, qp, g, _, _ = _setup(net, get("clapp++", predictor="full"), "int8")
    for sign in (1, -1):
        q = dict(qp)
        pw, pb = plan.params["enc.1.w"], plan.params["enc.1.b"]
        q["enc.1.w"] = torch.full_like(qp["enc.1.w"], pw.hi if sign > 0 else pw.lo)
        q["enc.1.b"] = torch.full_like(qp["enc.1.b"], pb.hi if sign > 0 else pb.lo)
        x = torch.full((2, 4, 8, 8), 255, dtype=torch.uint8)
        w, b = layer_weights(plan, q, 1)
        acc = int_layer_forward(net.layers[1], plan.layers[1], w, b, x)
        _, y, idx, _ = ref_layer(
            net, plan, {k: v.numpy() for k, v in q.items()}, 1, x.numpy().astype(np.int64)
        )
        assert np.array_equal(acc.y.numpy(), y) and np.array_equal(acc.sel.numpy(), idx)
        centre = w.double().abs().sum((1, 2, 3)) * 255 + b.double().abs()  # |acc| inside
        assert float(centre.max()) == 2**31 - 1

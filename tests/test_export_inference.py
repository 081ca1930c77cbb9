"""Inference graphs: the fp32 encoder equals edge.nets.encode (BatchNorm folded when baked,
weights as inputs otherwise), the integer encoder equals quant.integer.integer_forward bit
for bit; both at any batch size (dynamic N) or a fixed one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge import rules
from edge.errors import EdgeError
from edge.nets import encode, fold_batchnorm, preset
from export.inference import encoder_graph, integer_encoder_graph
from export.manifest import PARAMS
from export.runner import Runner
from export.trace import nonstandard_ops, op_counts
from quant.calibrate import make_plan
from quant.integer import integer_forward, quantize_input


def images(n: int, shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bn_net():
    """resnet8 keeps BatchNorms before folding; perturbed so that folding matters."""
    net = preset("resnet8", (3, 16, 16), 0.25)
    gen = torch.Generator().manual_seed(0)
    params = net.init_params(gen)
    return net, {k: v + 0.05 * torch.rand(v.shape, generator=gen) for k, v in params.items()}


def test_baked_fp32_encoder_folds_batchnorm_and_matches_encode(bn_net):
    net, params = bn_net
    model, io = encoder_graph(net, params, outputs="all", weights="baked")
    assert [t.name for t in io.inputs] == ["x"] and io.inputs[0].shape == ("N", 3, 16, 16)
    assert [t.name for t in io.outputs] == [f"y{i}" for i in range(len(net.blocks))]
    assert "BatchNormalization" not in op_counts(model) and nonstandard_ops(model) == []
    runner = Runner(model)
    for n in (1, 6):
        x = images(n, (3, 16, 16), n)
        outs = runner.run({"x": x})
        for i, want in enumerate(encode(net, params, x)):
            np.testing.assert_allclose(outs[f"y{i}"], want.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("outputs", ["all", "last"])
def test_fp32_encoder_with_weights_as_inputs(outputs):
    net = preset("digits", (1, 8, 8), 0.25)
    net, params = fold_batchnorm(net, net.init_params(torch.Generator().manual_seed(1)))
    model, io = encoder_graph(net, params, outputs=outputs, weights="inputs")
    names = [t.name for t in io.inputs]
    assert names[0] == "x" and set(names[1:]) == {PARAMS + k for k in params
                                                  if k.startswith("enc.")}
    runner = Runner(model)
    moved = {k: v * 1.5 for k, v in params.items()}  # the graph uses the weights it is fed
    for n in (1, 7):
        x = images(n, (1, 8, 8), 10 + n)
        outs = runner.run({"x": x, **{t: moved[t[len(PARAMS):]] for t in names[1:]}})
        want = encode(net, moved, x)
        if outputs == "last":
            assert list(outs) == ["y"]
            np.testing.assert_allclose(outs["y"], want[-1].numpy(), rtol=1e-4, atol=1e-5)
        else:
            for i, w in enumerate(want):
                np.testing.assert_allclose(outs[f"y{i}"], w.numpy(), rtol=1e-4, atol=1e-5)


def test_fixed_batch_encoder_refuses_another_batch():
    net = preset("digits", (1, 8, 8), 0.25)
    params = net.init_params(torch.Generator().manual_seed(0))
    model, io = encoder_graph(net, params, outputs="last", batch_size=3)
    assert io.inputs[0].shape == (3, 1, 8, 8) and io.outputs[0].shape[0] == 3
    with pytest.raises(EdgeError, match=r"input x has shape \[2, 1, 8, 8\], the graph wants "
                                        r"\[3, 1, 8, 8\]"):
        Runner(model).run({"x": images(2, (1, 8, 8), 0)})


def test_encoder_rejects_unknown_modes():
    net = preset("digits", (1, 8, 8), 0.25)
    params = net.init_params(torch.Generator().manual_seed(0))
    with pytest.raises(EdgeError, match="unknown encoder outputs 'middle'; valid: all, last"):
        encoder_graph(net, params, outputs="middle")
    with pytest.raises(EdgeError, match="unknown weights mode 'flash'; valid: baked, inputs"):
        encoder_graph(net, params, weights="flash")


@pytest.fixture(scope="module")
def int_net():
    net = preset("mnist", (1, 14, 14), 0.25)  # odd map sizes: pooling crops
    rule = rules.get("clapp++")
    gen = torch.Generator().manual_seed(0)
    params = net.init_params(gen)
    net, params = fold_batchnorm(net, params)
    rule.check(net)
    params.update(rule.init(net, gen))
    views = [tuple(torch.randn(2, 6, 1, 14, 14, generator=gen))]
    plan, stores = make_plan(net, rule, params, views, "int8-w16")
    return net, plan, stores


@pytest.mark.parametrize("weights", ["baked", "inputs"])
def test_integer_encoder_is_bit_exact_at_any_batch(int_net, weights):
    """int8 x in, uint8 codes out, integer ops only, equal to integer_forward."""
    net, plan, stores = int_net
    model, io = integer_encoder_graph(net, plan, stores, outputs="all", weights=weights)
    assert nonstandard_ops(model) == []
    ops = op_counts(model)
    assert "ConvInteger" in ops and "Conv" not in ops
    assert io.inputs[0].dtype == "int8" and io.inputs[0].shape[0] == "N"
    assert {t.dtype for t in io.outputs} == {"uint8"}
    runner = Runner(model)
    fed = {f"params/{k}": v.numpy() for k, v in stores.items() if k.startswith("enc.")}
    for n in (1, 7):
        x = quantize_input(images(n, (1, 14, 14), n, scale=3.0), plan.f_in)
        outs = runner.run({"x": x.numpy(), **(fed if weights == "inputs" else {})})
        ys = integer_forward(net, plan, stores, x)
        assert len(ys) == len(net.blocks)
        for i, y in enumerate(ys):
            assert str(outs[f"y{i}"].dtype) == "uint8"
            np.testing.assert_array_equal(outs[f"y{i}"], y.t.numpy())


def test_integer_encoder_uses_the_stores_it_is_fed(int_net):
    net, plan, stores = int_net
    model, io = integer_encoder_graph(net, plan, stores, outputs="last", weights="inputs")
    key = "enc.0.0.w"
    other = dict(stores)
    other[key] = torch.flip(stores[key], dims=(0,))  # same values, other filters
    x = quantize_input(images(4, (1, 14, 14), 9, scale=3.0), plan.f_in)
    got = Runner(model).run({"x": x.numpy(), **{t.name: other[t.name[len(PARAMS):]].numpy()
                                                for t in io.inputs[1:]}})
    np.testing.assert_array_equal(got["y"], integer_forward(net, plan, other, x)[-1].t.numpy())
    assert not np.array_equal(got["y"], integer_forward(net, plan, stores, x)[-1].t.numpy())

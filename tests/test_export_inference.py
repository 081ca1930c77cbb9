"""Inference graphs: fp32 encoder equal to edge.nets.encode; int8 QCDQ and QONNX through
Brevitas equal to the Brevitas model they came from, and close to fp32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edge.errors import EdgeError
from edge.nets import encode, init_params, preset
from export.inference import encoder_graph, qcdq_graph, qonnx_graph, quant_encoder, run_qonnx
from export.runner import Runner
from export.trace import nonstandard_ops, op_counts


@pytest.fixture(scope="module")
def net_params():
    net = preset("digits", (1, 8, 8), width=0.25)
    params = init_params(net, torch.Generator().manual_seed(0))
    params = {k: v + 0.01 if k.endswith(".b") else v for k, v in params.items()}
    return net, params


@pytest.fixture(scope="module")
def images():
    gen = torch.Generator().manual_seed(4)
    return torch.randn(64, 1, 8, 8, generator=gen), torch.randn(5, 1, 8, 8, generator=gen)


@pytest.mark.parametrize("weights", ["baked", "inputs"])
def test_fp32_encoder_matches_torch_at_any_batch(net_params, weights):
    net, params = net_params
    model, io = encoder_graph(net, params, outputs="all", weights=weights)
    assert [t.name for t in io.outputs] == ["y0", "y1", "y2"]
    assert io.inputs[0].shape == ("N", 1, 8, 8)
    assert set(op_counts(model)) == {"Conv", "Relu", "MaxPool"}
    assert nonstandard_ops(model) == []
    runner = Runner(model)
    for n in (1, 7):
        x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(n))
        feeds = {"x": x}
        if weights == "inputs":
            feeds.update({t.name: params[t.name.split("/", 1)[1]] for t in io.inputs[1:]})
        outs = runner.run(feeds)
        for i, want in enumerate(encode(net, params, x)):
            np.testing.assert_allclose(outs[f"y{i}"], want.numpy(), rtol=1e-5, atol=1e-5)


def test_fp32_encoder_rejects_unknown_modes(net_params):
    with pytest.raises(EdgeError, match="unknown encoder outputs"):
        encoder_graph(*net_params, outputs="middle")
    with pytest.raises(EdgeError, match="unknown weights mode"):
        encoder_graph(*net_params, weights="flash")


@pytest.fixture(scope="module")
def qmodel(net_params, images):
    return quant_encoder(*net_params, images[0])


def test_int8_qcdq_matches_brevitas_and_fp32(net_params, images, qmodel, tmp_path):
    net, params = net_params
    x = images[1]
    model = qcdq_graph(qmodel, x, tmp_path / "q.onnx")
    assert (tmp_path / "q.onnx").is_file()
    ops = op_counts(model)
    assert nonstandard_ops(model) == []
    assert ops["QuantizeLinear"] >= 1 and ops["DequantizeLinear"] >= 2 * len(net.layers)
    assert any(i.data_type == onnx.TensorProto.INT8 for i in model.graph.initializer)
    with torch.no_grad():
        want = [t.numpy() for t in qmodel(x)]
    outs = Runner(model).run({"x": x})
    fp32 = encode(net, params, x)
    for i, w in enumerate(want):
        np.testing.assert_allclose(outs[f"y{i}"], w, rtol=0, atol=1e-5)
        rel = np.linalg.norm(outs[f"y{i}"] - fp32[i].numpy()) / np.linalg.norm(fp32[i].numpy())
        assert rel < 0.1, (i, rel)


def test_qonnx_matches_brevitas(images, qmodel, tmp_path):
    x = images[1]
    model = qonnx_graph(qmodel, x, tmp_path / "q.qonnx.onnx")
    assert {n.domain for n in model.graph.node if n.op_type == "Quant"} == {
        "qonnx.custom_op.general"}
    with torch.no_grad():
        want = [t.numpy() for t in qmodel(x)]
    for got, w in zip(run_qonnx(model, x.numpy()), want, strict=True):
        np.testing.assert_allclose(got, w, rtol=0, atol=1e-5)


@pytest.mark.parametrize("weights", ["baked", "inputs"])
def test_integer_encoder_is_bit_exact_at_any_batch(weights):
    """Integer mode's infer.onnx: int8 x in, uint8 codes out, integer ops only, equal to
    quant.integer.integer_forward bit for bit (odd map sizes: pooling crops)."""
    from edge.rules import get
    from export.inference import integer_encoder_graph
    from quant.calibrate import make_plan, quantize_input
    from quant.integer import integer_forward

    net = preset("mnist", (1, 14, 14), width=0.25)
    rule = get("clapp++")
    rule.check(net)
    gen = torch.Generator().manual_seed(0)
    params = init_params(net, gen)
    params.update(rule.init(net, gen))
    views = [tuple(torch.randn(6, 1, 14, 14, generator=gen) for _ in range(2))]
    plan, q = make_plan(net, rule, params, views, "int8-w16")
    model, io = integer_encoder_graph(net, plan, q, outputs="all", weights=weights)
    assert nonstandard_ops(model) == []
    assert "ConvInteger" in op_counts(model) and "Conv" not in op_counts(model)
    assert io.inputs[0].dtype == "int8" and {t.dtype for t in io.outputs} == {"uint8"}
    runner = Runner(model)
    stores = {f"params/{k}": v.numpy() for k, v in q.items() if k.startswith("enc.")}
    for n in (1, 7):
        x = quantize_input(3 * torch.randn(n, 1, 14, 14, generator=gen), plan.f_in)
        outs = runner.run({"x": x.numpy(), **(stores if weights == "inputs" else {})})
        for i, y in enumerate(integer_forward(net, plan, q, x)):
            np.testing.assert_array_equal(outs[f"y{i}"], y.numpy())

"""Brevitas quantized encoders: frozen scales, QCDQ export run by onnxruntime, and the
integer forward pass agreeing with both."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge.nets import init_params, mlp, vgg
from edge.rules import get
from quant.calibrate import make_plan, quantize_input
from quant.integer import integer_forward
from quant.layers import (
    EncoderExponents,
    build_quant_encoder,
    calibrate_encoder,
    encoder_exponents,
    export_qcdq,
)
from quant.spec import dequantize, pow2_scale


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    yield
    torch.set_num_threads(n)


NET = vgg([4, 6], [1, 2], (1, 8, 8))


def _encoder(per_channel=False):
    g = torch.Generator().manual_seed(0)
    params = init_params(NET, g)
    params["enc.0.b"] = torch.randn(4, generator=g) * 0.1
    enc = build_quant_encoder(NET, params, per_channel=per_channel)
    batches = [torch.randn(8, 1, 8, 8, generator=g) for _ in range(3)]
    return calibrate_encoder(enc, batches), params, g


@pytest.mark.parametrize("per_channel", [False, True])
def test_scales_are_frozen_after_calibration(per_channel):
    enc, _, g = _encoder(per_channel)
    before = encoder_exponents(enc)
    assert all(isinstance(f, int) for f in (before.f_in, *before.f_y))
    with torch.no_grad():
        for mod in enc.layers:
            mod.weight.mul_(8.0)  # would move a max-based scale by 3 bits
    enc.train()
    enc(torch.randn(8, 1, 8, 8, generator=g) * 100)  # training-mode forward: no stats either
    enc.eval()
    assert encoder_exponents(enc) == before
    # the stock quantizer would have followed the weights: the freezing is what holds them
    from brevitas.nn import QuantConv2d
    from brevitas.quant.fixed_point import Int8WeightPerTensorFixedPoint

    stock = QuantConv2d(1, 4, 3, weight_quant=Int8WeightPerTensorFixedPoint)
    s0 = float(stock.quant_weight().scale)
    with torch.no_grad():
        stock.weight.mul_(8.0)
    assert float(stock.quant_weight().scale) == 8 * s0


def test_fixed_exponents_build_a_frozen_encoder_at_those_scales():
    enc, params, _ = _encoder()
    ex = EncoderExponents(4, (6, 9), (3, 2))
    fixed = build_quant_encoder(NET, params, exponents=ex)
    assert encoder_exponents(fixed) == ex
    assert encoder_exponents(enc) != ex


def _ort_outputs(path, x, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC):
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


@pytest.mark.parametrize("net", [NET, mlp([7, 5], (1, 4, 4))], ids=["conv", "linear"])
def test_qcdq_export_runs_in_onnxruntime_like_brevitas(tmp_path, net):
    g = torch.Generator().manual_seed(1)
    params = init_params(net, g)
    enc = calibrate_encoder(
        build_quant_encoder(net, params),
        [torch.randn(8, *net.in_shape, generator=g) for _ in range(2)],
    )
    x = torch.randn(5, *net.in_shape, generator=g)
    with torch.no_grad():
        want = enc(x)
    path = export_qcdq(enc, x, tmp_path / "enc.onnx")
    got = _ort_outputs(path, x)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b.numpy())


def test_integer_forward_equals_brevitas_and_onnx_at_the_plan_scales(tmp_path):
    """The integer pass of the training step is the quantized network: at the plan's scales
    the Brevitas encoder and its QCDQ graph give the same numbers."""
    net = vgg([4, 6, 8], [2, 3], (3, 8, 8))
    rule = get("clapp++", rank=3)
    rule.check(net)
    g = torch.Generator().manual_seed(2)
    params = init_params(net, g)
    params.update(rule.init(net, g))
    views = [tuple(torch.randn(6, 3, 8, 8, generator=g) for _ in range(2))]
    plan, qp = make_plan(net, rule, params, views, "int8-w16")
    ex = EncoderExponents(
        plan.f_in, tuple(lp.f_w for lp in plan.layers), tuple(lp.f_y for lp in plan.layers)
    )
    from quant.train import QuantState, dequantized_params

    deq = dequantized_params(QuantState("integer", plan, qp, {}))
    enc = build_quant_encoder(net, deq, exponents=ex)
    x = torch.randn(6, 3, 8, 8, generator=g)
    ys = integer_forward(net, plan, qp, quantize_input(x, plan.f_in))
    ints = [dequantize(y, pow2_scale(lp.f_y)) for y, lp in zip(ys, plan.layers, strict=True)]
    with torch.no_grad():
        brevitas = enc(x)
    onnx_out = _ort_outputs(export_qcdq(enc, x, tmp_path / "plan.onnx"), x)
    for a, b, c in zip(ints, brevitas, onnx_out, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        np.testing.assert_array_equal(a.numpy(), c)


def test_integer_primitives_trace_to_standard_integer_onnx_ops(tmp_path):
    """What the exporter relies on: the integer ops of quant.intops trace (TorchScript
    exporter) to standard ONNX integer ops (ConvInteger, MatMulInteger, Mod/Div floors, no
    float arithmetic) and run bit-exactly in onnxruntime: negative floor shifts (on the int32
    accumulator and on int64), chunked Hebbian sums and matmuls, every 8-bit signedness
    pairing, extreme operands."""
    import onnx

    from quant import intops

    class Ops(torch.nn.Module):
        def forward(self, x, w, e, noise, a, b):
            acc = intops.int_conv2d(x, w)
            g = intops.int_conv2d_weight(x, e)
            s8 = intops.narrow(intops.floor_shift(a.to(torch.int64) * 3 - 300, 2), torch.int8)
            return (
                acc,
                intops.saturate32(g),
                intops.floor_shift(-acc, 3),
                intops.floor_shift(intops.widen(acc) - 2**40, 7),
                intops.floor_mod(-acc, 6),
                intops.round_shift(acc - 1000, 4),
                intops.stochastic_shift(-acc, 5, noise),
                intops.stochastic_shift(acc, 19, noise),
                intops.div_round(-acc, 9),
                intops.div_round(acc - 77, 12),
                intops.int_matmul(a, b),  # u8 x s8
                intops.int_matmul(s8, b),  # s8 x s8
                intops.int_matmul(b.t(), a.t()),  # s8 x u8
                intops.int_matmul(a, a.t()),  # u8 x u8, K beyond one int32 chunk
            )

    g = torch.Generator().manual_seed(0)
    n = 2 * intops.conv_weight_chunk(8, 8, 256, 128) + 1  # three chunks of the Hebbian sum
    x = torch.randint(0, 256, (n, 3, 8, 8), generator=g).to(torch.uint8)
    x[:, :, :4] = 255  # extreme operands: no saturating fast path may touch them
    w = torch.randint(-127, 128, (4, 3, 3, 3), generator=g).to(torch.int8)
    e = torch.full((n, 4, 8, 8), 127, dtype=torch.int8)
    e[:, :2] = torch.randint(-127, 128, (n, 2, 8, 8), generator=g).to(torch.int8)
    noise = torch.randint(0, 1 << 16, (n, 4, 8, 8), generator=g).to(torch.int32)
    a = torch.randint(0, 256, (3, 40_000), generator=g).to(torch.uint8)
    a[:, ::2] = 255
    b = torch.randint(-127, 128, (40_000, 2), generator=g).to(torch.int8)
    b[::2] = 127
    inputs = (x, w, e, noise, a, b)
    want = Ops()(*inputs)
    path = tmp_path / "ops.onnx"
    torch.onnx.export(Ops(), inputs, str(path), dynamo=False, opset_version=18)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"ConvInteger", "MatMulInteger", "Mod"} <= ops
    assert not ops & {"Conv", "MatMul", "Floor", "BitShift"}, ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(
        None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs, strict=True)}
    )
    assert float(want[1].abs().max()) >= 2**31 - 1  # the Hebbian sum did saturate
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.numpy().dtype, i
        np.testing.assert_array_equal(a, b.numpy(), err_msg=f"output {i}")

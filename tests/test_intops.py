"""The integer arithmetic of the integer forms: exact in eager torch, the same bits in ONNX.

Expected values come from plain Python / NumPy int64 arithmetic written in the tests."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edge.layers import intops
from edge.layers.intops import ConvGeom


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    yield
    torch.set_num_threads(n)


def test_floor_shift_floors_negative_values():
    x = torch.tensor([-5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5])
    assert intops.floor_shift(x, 1).tolist() == [-3, -2, -2, -1, -1, 0, 0, 1, 1, 2, 2]
    assert intops.floor_shift(x, 2).tolist() == [math.floor(v / 4) for v in x.tolist()]
    assert intops.floor_shift(x, -2).tolist() == [4 * v for v in x.tolist()]


def test_round_shift_and_div_round_are_half_to_even():
    x = torch.arange(-40, 41)
    for k in (1, 2, 3):
        assert intops.round_shift(x, k).tolist() == [round(v / 2**k) for v in x.tolist()]
    for d in (3, 4, 9, 49):
        assert intops.div_round(x, d).tolist() == [round(v / d) for v in x.tolist()]


@pytest.mark.parametrize("k", [3, 11, 16, 21])
def test_stochastic_rounding_is_unbiased(k):
    """The mean of many stochastic roundings of x / 2^k is within 4 standard errors of the
    real value (fixed seed), for k below, at and above the 16 random bits."""
    g = torch.Generator().manual_seed(1234)
    trials = 20000
    for x in (-12345, -7, 1, 2**k // 3, 999_999):
        xs = torch.full((trials,), x, dtype=torch.int64)
        noise = torch.randint(0, 1 << intops.NOISE_BITS, (trials,), generator=g)
        r = intops.stochastic_shift(xs, k, noise).double()
        real = x / 2**k
        assert set(r.unique().tolist()) <= {math.floor(real), math.ceil(real)}
        se = max(float(r.std()) / math.sqrt(trials), 1e-9)
        assert abs(float(r.mean()) - real) < 4 * se + 2.0**-intops.NOISE_BITS, (x, k)


def test_stochastic_rounding_is_exact_without_a_fraction():
    x = torch.tensor([-8, -3, 0, 5])
    noise = torch.tensor([0, 65535, 123, 40000])
    assert intops.stochastic_shift(x, 0, noise).tolist() == [-8, -3, 0, 5]
    assert intops.stochastic_shift(x, -2, noise).tolist() == [-32, -12, 0, 20]
    assert intops.stochastic_shift(torch.tensor([-16, 16]), 3, noise[:2]).tolist() == [-2, 2]


def test_saturation_happens_before_narrowing():
    big = torch.tensor([2**40, -(2**40), 2**31, -(2**31) - 1, 123])
    sat = intops.saturate32(big)
    assert sat.dtype == torch.int32  # the cast after the clamp is lossless
    top = intops.GRAD_MAX
    assert sat.tolist() == [top, -top, top, -top, 123]
    assert (-sat).tolist() == [-v for v in sat.tolist()]  # symmetric: negation never wraps


def test_stochastic_rounding_of_int32_equals_the_int64_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-(2**31) + 1, 2**31 - 1, (5000,), generator=g, dtype=torch.int64)
    x[:4] = torch.tensor([2**31 - 1, -(2**31 - 1), 0, -1])
    noise = torch.randint(0, 1 << 16, (5000,), generator=g, dtype=torch.int32)
    for k in (1, 5, 16, 20, 31):
        r = noise.long() >> max(0, 16 - k)
        xs = x >> (k - 16) if k > 16 else x
        want = (xs + r) >> min(k, 16)
        got = intops.stochastic_shift(x.to(torch.int32), k, noise)
        assert got.dtype == torch.int32 and torch.equal(got.long(), want), k
        g = intops.saturate32(x)
        bounded = intops.stochastic_shift(-g, k, noise, bounded=True)
        want_b = ((-g.long() >> (k - 16) if k > 16 else -g.long()) + r) >> min(k, 16)
        assert bounded.dtype == torch.int32 and torch.equal(bounded.long(), want_b), k


def _operand(g, shape, dtype, mode="random"):
    lo, hi = (0, 255) if dtype == torch.uint8 else (-127, 127)
    if mode == "max":  # every product near its largest (random parity): sums far above 2^24
        return (hi - torch.randint(0, 2, shape, generator=g)).to(dtype)
    if mode == "extreme":  # only the extremes: any saturating pair-sum kernel shows
        return torch.where(torch.rand(shape, generator=g) < 0.5, lo, hi).to(dtype)
    return torch.randint(lo, hi + 1, shape, generator=g).to(dtype)


def np_conv(x, w, geom):
    """int64 convolution: a sum over kernel offsets and each group's channels."""
    kh, kw, sh, sw, ph, pw, groups = geom
    n, c, h, wd = x.shape
    o, cg = w.shape[:2]
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    out = np.zeros((n, o, oh, ow), np.int64)
    og = o // groups
    for i in range(kh):
        for j in range(kw):
            win = xp[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
            for gi in range(groups):
                wg = w[gi * og:(gi + 1) * og, :, i, j]
                out[:, gi * og:(gi + 1) * og] += np.einsum(
                    "nchw,oc->nohw", win[:, gi * cg:(gi + 1) * cg], wg)
    return out


GEOMS = [ConvGeom((3, 3), (1, 1), (1, 1), 1), ConvGeom((3, 3), (2, 2), (1, 1), 2),
         ConvGeom((3, 3), (2, 1), (1, 1), 8), ConvGeom((1, 1), (1, 1), (0, 0), 1),
         ConvGeom((5, 2), (2, 2), (2, 1), 1)]


@pytest.mark.parametrize("geom", GEOMS, ids=str)
@pytest.mark.parametrize("extreme", ["random", "extreme", "max"])
@pytest.mark.parametrize("x_dtype", [torch.uint8, torch.int8])
def test_integer_convolutions_are_exact(x_dtype, extreme, geom):
    """Forward, weight gradient and input gradient of any geometry against NumPy int64 sums
    far beyond float32's 2^24 (the eager float32 paths chunk them)."""
    g = torch.Generator().manual_seed(0)
    groups = geom[6]
    c = 72 if groups < 8 else 8
    x = _operand(g, (6, c, 9, 7), x_dtype, extreme)
    w = _operand(g, (8, c // groups, geom[0], geom[1]), torch.int8, extreme)
    acc = intops.int_conv2d(x, w, geom)
    want = np_conv(x.numpy().astype(np.int64), w.numpy().astype(np.int64), geom)
    assert np.array_equal(acc.numpy(), want)
    e = _operand(g, tuple(acc.shape), torch.int8, extreme)
    xn, en, wn = (t.numpy().astype(np.int64) for t in (x, e, w))
    # <e, conv(x, w)> = <dw, w> = <x, dx> for every w, x: the adjoints by their definition
    gw = intops.int_conv2d_weight(x, e, geom).numpy()
    gx = intops.int_conv2d_input(e, w, geom, (9, 7)).numpy()
    unit = np.zeros_like(wn)
    for idx in [(0, 0, 0, 0), (7, c // groups - 1, geom[0] - 1, geom[1] - 1),
                (3, min(1, c // groups - 1), 0, 0)]:
        unit[...] = 0
        unit[idx] = 1
        assert gw[idx] == int((en * np_conv(xn, unit, geom)).sum())
    xu = np.zeros_like(xn)
    for idx in [(0, 0, 0, 0), (5, c - 1, 8, 6), (2, 3, 4, 1)]:
        xu[...] = 0
        xu[idx] = 1
        assert gx[idx] == int((en * np_conv(xu, wn, geom)).sum())


def test_integer_matmul_is_exact():
    g = torch.Generator().manual_seed(0)
    for a_dtype in (torch.uint8, torch.int8):
        for b_dtype in (torch.uint8, torch.int8):
            a = _operand(g, (8, 1500), a_dtype, "max")
            b = _operand(g, (1500, 5), b_dtype, "max")
            want = a.numpy().astype(np.int64) @ b.numpy().astype(np.int64)
            assert np.array_equal(intops.int_matmul(a, b).numpy(), want)
    with pytest.raises(TypeError, match="8-bit|uint8"):
        intops.int_matmul(torch.ones(2, 2, dtype=torch.int64), b[:2])


def test_integer_primitives_trace_to_standard_integer_onnx_ops(tmp_path):
    """What the exporter relies on: the integer ops trace (TorchScript exporter) to standard
    ONNX integer ops (ConvInteger, MatMulInteger, Mod/Div floors, no float arithmetic) and run
    bit-exactly in onnxruntime: negative floor shifts, chunked Hebbian sums and matmuls,
    strided and grouped convolutions and their adjoints, every 8-bit signedness pairing."""
    import onnx

    g3 = ConvGeom((3, 3), (1, 1), (1, 1), 1)
    g2 = ConvGeom((3, 3), (2, 2), (1, 1), 3)

    class Ops(torch.nn.Module):
        def forward(self, x, w, e, noise, a, b, wg, eg):
            acc = intops.int_conv2d(x, w, g3)
            s8 = intops.narrow(intops.floor_shift(a.to(torch.int64) * 3 - 300, 2), torch.int8)
            return (
                acc,
                intops.saturate32(intops.int_conv2d_weight(x, e, g3)),
                intops.int_conv2d(x, wg, g2),
                intops.int_conv2d_weight(x, eg, g2),
                intops.int_conv2d_input(eg, wg, g2, (8, 8)),
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
    wg = torch.randint(-127, 128, (6, 1, 3, 3), generator=g).to(torch.int8)
    eg = torch.randint(-127, 128, (n, 6, 4, 4), generator=g).to(torch.int8)
    noise = torch.randint(0, 1 << 16, (n, 4, 8, 8), generator=g).to(torch.int32)
    a = torch.randint(0, 256, (3, 40_000), generator=g).to(torch.uint8)
    a[:, ::2] = 255
    b = torch.randint(-127, 128, (40_000, 2), generator=g).to(torch.int8)
    b[::2] = 127
    inputs = (x, w, e, noise, a, b, wg, eg)
    want = Ops()(*inputs)
    path = tmp_path / "ops.onnx"
    torch.onnx.export(Ops(), inputs, str(path), dynamo=False, opset_version=18)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"ConvInteger", "MatMulInteger", "Mod"} <= ops
    assert not ops & {"Conv", "ConvTranspose", "MatMul", "Floor", "BitShift"}, ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(
        None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs, strict=True)}
    )
    assert int(want[1].abs().max()) == intops.GRAD_MAX  # the Hebbian sum did saturate
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.numpy().dtype, i
        np.testing.assert_array_equal(a, b.numpy(), err_msg=f"output {i}")

"""QuantSpec validation, quantize/dequantize round trips, and the integer primitives."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.errors import EdgeError
from quant import intops, reference
from quant.spec import (
    QuantSpec,
    dequantize,
    exponent_of,
    pow2_exponent,
    pow2_scale,
    quantize,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize(
    "kwargs, why",
    [
        ({"bits": 0}, "0-bit"),
        ({"bits": 1, "signed": True}, "1-bit signed"),
        ({"bits": 17, "role": "weight"}, "17-bit weights"),
        ({"bits": 33, "role": "accumulator"}, "33-bit accumulators"),
        ({"bits": 8, "role": "gradient"}, "unknown quantization role"),
        ({"bits": 8, "signed": False, "narrow": True}, "narrow range"),
        ({"bits": 8, "per_channel": True}, "per-channel"),
    ],
)
def test_unsupported_specs_are_one_line_errors(kwargs, why):
    with pytest.raises(EdgeError, match=why) as e:
        QuantSpec(**kwargs)
    assert "\n" not in str(e.value)


def test_supported_specs_and_ranges():
    assert QuantSpec(1, signed=False).qmax == 1
    w = QuantSpec(8, narrow=True, role="weight", per_channel=True)
    assert (w.qmin, w.qmax, w.dtype) == (-127, 127, torch.int8)
    assert (QuantSpec(8, signed=False).qmin, QuantSpec(8, signed=False).qmax) == (0, 255)
    assert QuantSpec(16, role="weight").dtype == torch.int16
    assert QuantSpec(16, signed=False).dtype == torch.int32
    assert QuantSpec(32, role="accumulator").dtype == torch.int32


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(2, 16),
    signed=st.booleans(),
    exponent=st.integers(-6, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_round_trip_is_exact_on_the_grid(bits, signed, exponent, seed):
    """Every representable value survives quantize(dequantize(q)) unchanged, and the error of
    any in-range real value is at most half a step."""
    spec = QuantSpec(bits, signed)
    s = pow2_scale(exponent)
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(spec.qmin, spec.qmax + 1, (64,), generator=g).to(spec.dtype)
    assert torch.equal(quantize(dequantize(q, s), s, 0, bits, signed), q)
    x = (torch.rand(64, generator=g, dtype=torch.float64) * (spec.qmax - spec.qmin) + spec.qmin) * s
    err = (dequantize(quantize(x, s, 0, bits, signed), s).double() - x).abs()
    assert float(err.max()) <= s / 2 + 1e-12 * s


def test_quantize_rounds_half_to_even_and_clamps_before_the_cast():
    q = quantize(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 1000.0, -1000.0]), 1.0, 0, 8, True)
    assert q.dtype == torch.int8
    assert q.tolist() == [0, 2, 2, 0, -2, 127, -128]  # saturated, not wrapped
    u = quantize(torch.tensor([-3.0, 300.0, 255.4]), 1.0, 0, 8, False)
    assert u.dtype == torch.uint8 and u.tolist() == [0, 255, 255]
    assert quantize(torch.tensor([-200.0]), 1.0, 0, 8, True, narrow=True).tolist() == [-127]


def test_power_of_two_helpers():
    assert pow2_exponent(1.0, 127) == 6  # 127 / 64 >= 1 > 127 / 128
    assert pow2_exponent(127.0, 127) == 0
    assert pow2_exponent(0.01, 255) == 14
    for f in (-3, 0, 5, 20):
        assert exponent_of(pow2_scale(f)) == f
    with pytest.raises(EdgeError, match="power of two"):
        exponent_of(0.3)
    with pytest.raises(EdgeError, match="calibrate"):
        pow2_exponent(0.0, 127)


def test_floor_shift_floors_negative_values():
    x = torch.tensor([-5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5])
    assert intops.floor_shift(x, 1).tolist() == [-3, -2, -2, -1, -1, 0, 0, 1, 1, 2, 2]
    assert intops.floor_shift(x, 2).tolist() == [math.floor(v / 4) for v in x.tolist()]
    assert intops.floor_shift(x, -2).tolist() == [4 * v for v in x.tolist()]
    assert np.array_equal(reference.rshift_floor(x.numpy(), 2), intops.floor_shift(x, 2).numpy())


def test_round_shift_and_div_round_are_half_to_even():
    x = torch.arange(-40, 41)
    for k in (1, 2, 3):
        want = [round(v / 2**k) for v in x.tolist()]  # Python's round is half to even
        assert intops.round_shift(x, k).tolist() == want
        assert reference.rshift_round_even(x.numpy(), k).tolist() == want
    for d in (3, 4, 9, 49):
        want = [round(v / d) for v in x.tolist()]
        assert intops.div_round(x, d).tolist() == want
        assert reference.div_round_even(x.numpy(), d).tolist() == want


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
        ref = reference.stochastic(xs.numpy(), k, noise.numpy())
        assert np.array_equal(ref, r.long().numpy())


def test_stochastic_rounding_is_exact_without_a_fraction():
    x = torch.tensor([-8, -3, 0, 5])
    noise = torch.tensor([0, 65535, 123, 40000])
    assert intops.stochastic_shift(x, 0, noise).tolist() == [-8, -3, 0, 5]
    assert intops.stochastic_shift(x, -2, noise).tolist() == [-32, -12, 0, 20]
    assert intops.stochastic_shift(torch.tensor([-16, 16]), 3, noise[:2]).tolist() == [-2, 2]


def test_saturation_happens_before_narrowing():
    big = torch.tensor([2**40, -(2**40), 2**31, -(2**31) - 1, 123])
    sat = intops.saturate32(big)
    assert sat.tolist() == [2**31 - 1, -(2**31), 2**31 - 1, -(2**31), 123]
    assert sat.to(torch.int32).tolist() == sat.tolist()  # the cast after the clamp is lossless
    assert big.to(torch.int32).tolist() != sat.tolist()  # a bare cast would have wrapped


def _operand(g, shape, dtype, mode="random"):
    lo, hi = (0, 255) if dtype == torch.uint8 else (-127, 127)
    if mode == "max":  # every product near its largest (random parity): sums far above 2^24
        return (hi - torch.randint(0, 2, shape, generator=g)).to(dtype)
    if mode == "extreme":  # only the extremes: any saturating pair-sum kernel shows
        return torch.where(torch.rand(shape, generator=g) < 0.5, lo, hi).to(dtype)
    return torch.randint(lo, hi + 1, shape, generator=g).to(dtype)


@pytest.mark.parametrize("extreme", ["random", "extreme", "max"])
@pytest.mark.parametrize("x_dtype", [torch.uint8, torch.int8])
def test_integer_products_are_exact(x_dtype, extreme):
    """Exact against the NumPy int64 reference, with sums far beyond float32's 2^24 (the
    eager float32 paths chunk them) and for both operand signednesses."""
    g = torch.Generator().manual_seed(0)
    x = _operand(g, (70, 70, 9, 7), x_dtype, extreme)  # 9 x 70 x 255 x 127 > 2^24, and
    w = _operand(g, (4, 70, 3, 3), torch.int8, extreme)
    e = _operand(g, (70, 4, 9, 7), torch.int8, extreme)  # 70 x 9 x 7 x 255 x 127 > 2^27
    xn, wn, en = (t.numpy().astype(np.int64) for t in (x, w, e))
    assert np.array_equal(intops.int_conv2d(x, w).numpy(), reference.conv3x3(xn, wn))
    assert np.array_equal(
        intops.int_conv2d_weight(x, e).numpy(), reference.conv3x3_weight_grad(xn, en)
    )
    for b_dtype in (torch.uint8, torch.int8):
        a = _operand(g, (8, 1500), x_dtype, extreme)
        b = _operand(g, (1500, 5), b_dtype, extreme)
        want = a.numpy().astype(np.int64) @ b.numpy().astype(np.int64)
        assert np.array_equal(intops.int_matmul(a, b).numpy(), want)
    with pytest.raises(TypeError, match="8-bit|uint8"):
        intops.int_matmul(torch.ones(2, 2, dtype=torch.int64), b[:2])

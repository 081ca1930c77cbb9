"""QuantSpec validation, quantize/dequantize round trips, power-of-two scales."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.errors import EdgeError
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

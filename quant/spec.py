"""What a quantized tensor is: `QuantSpec`, the one `quantize` / `dequantize`, power-of-two scales.

A quantized tensor is an integer tensor q and a scale s (and a zero point, 0 everywhere in
edge): the real value is x = s * (q - zero_point). edge uses power-of-two scales only,
s = 2^-f with an integer exponent f ("f fractional bits"), so every rescale in integer
arithmetic is a shift.

Rounding in `quantize`: round half to even (`torch.round`), the rule of ONNX QuantizeLinear
and of Brevitas, so the Brevitas forward, its QCDQ export and this function agree bit for
bit. The integer requantizations of `quant.intops` use the same rule.

Clamping happens before the cast: `quantize` rounds in floating point, clamps to the integer
range of the spec, and only then narrows, so nothing ever wraps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from edge.errors import EdgeError

ROLES = ("weight", "activation", "accumulator")
MAX_BITS = {"weight": 16, "activation": 16, "accumulator": 32}


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    bits: integer width; signed: two's complement range or unsigned; narrow: drop the most
    negative code (int8 weights use [-127, 127], symmetric); per_channel: one scale per output
    channel (axis 0) instead of one per tensor; role: weight | activation | accumulator, which
    bounds the width (weights and activations <= 16 bits, accumulators <= 32).
    Scales are always powers of two.
    """

    bits: int = 8
    signed: bool = True
    narrow: bool = False
    per_channel: bool = False
    role: str = "activation"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise EdgeError(f"unknown quantization role {self.role!r}; valid: {', '.join(ROLES)}")
        lowest = 2 if self.signed else 1
        if self.bits < lowest:
            kind = "signed" if self.signed else "unsigned"
            raise EdgeError(
                f"{self.bits}-bit {kind} quantization is not supported; use >= {lowest}"
            )
        if self.bits > MAX_BITS[self.role]:
            raise EdgeError(
                f"{self.bits}-bit {self.role}s are not supported; use <= {MAX_BITS[self.role]} bits"
            )
        if self.narrow and not self.signed:
            raise EdgeError("a narrow range only applies to signed quantization")
        if self.per_channel and self.role != "weight":
            raise EdgeError("per-channel scales are only supported for weights")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def dtype(self) -> torch.dtype:
        """The narrowest torch dtype that holds the range."""
        if not self.signed and self.bits <= 8:
            return torch.uint8
        for bits, dt in ((8, torch.int8), (16, torch.int16), (32, torch.int32)):
            if self.bits <= bits - (0 if self.signed else 1):
                return dt
        return torch.int64


INT8_WEIGHT = QuantSpec(8, signed=True, narrow=True, role="weight")
INT8_ACT = QuantSpec(8, signed=True, role="activation")
UINT8_ACT = QuantSpec(8, signed=False, role="activation")
INT32_ACC = QuantSpec(32, signed=True, role="accumulator")


def quantize(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | int = 0,
    bits: int = 8,
    signed: bool = True,
    narrow: bool = False,
) -> Tensor:
    """q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax), as an integer tensor.

    `scale` (and `zero_point`) broadcast against x (per-channel: shape (C, 1, 1, 1)). Rounds
    half to even, clamps to the range of (bits, signed, narrow), then casts to the narrowest
    dtype holding that range (uint8, int8, int16, int32 or int64): the clamp comes first,
    nothing wraps. Computed in float64, exact for |x / scale| < 2^52.
    """
    spec = QuantSpec(bits, signed, narrow, role="accumulator" if bits > 16 else "activation")
    q = torch.round(x.to(torch.float64) / torch.as_tensor(scale, dtype=torch.float64))
    q = q + torch.as_tensor(zero_point, dtype=torch.float64)
    return q.clamp(spec.qmin, spec.qmax).to(spec.dtype)


def dequantize(q: Tensor, scale: Tensor | float, zero_point: Tensor | int = 0) -> Tensor:
    """x = scale * (q - zero_point), float32 (exact for power-of-two scales and |q| < 2^24)."""
    zp = torch.as_tensor(zero_point, dtype=torch.float64)
    return ((q.to(torch.float64) - zp) * torch.as_tensor(scale, dtype=torch.float64)).float()


def fake_quantize(x: Tensor, exponent: int, spec: QuantSpec) -> Tensor:
    """dequantize(quantize(x)) at scale 2^-exponent: the quantized forward in floating point."""
    s = pow2_scale(exponent)
    return dequantize(quantize(x, s, 0, spec.bits, spec.signed, spec.narrow), s)


def pow2_scale(exponent: int) -> float:
    """2^-exponent: the scale of a tensor with `exponent` fractional bits."""
    return math.ldexp(1.0, -exponent)


def pow2_exponent(max_abs: float, qmax: int) -> int:
    """The exponent f of the finest scale 2^-f that still represents `max_abs` in qmax codes.

    f = floor(log2(qmax / max_abs)), i.e. scale = 2^ceil(log2(max_abs / qmax)): the rule of
    Brevitas's fixed-point quantizers (power-of-two restriction with a ceil). A zero or
    non-finite maximum is an error: there is nothing to calibrate from.
    """
    if not (math.isfinite(max_abs) and max_abs > 0):
        raise EdgeError(f"cannot calibrate a power-of-two scale from a maximum of {max_abs}")
    return -math.ceil(math.log2(max_abs / qmax))


def exponent_of(scale: float) -> int:
    """f for a power-of-two scale 2^-f; anything else is an error."""
    m, e = math.frexp(float(scale))
    if m != 0.5:
        raise EdgeError(f"scale {scale} is not a power of two")
    return 1 - e

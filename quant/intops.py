"""The integer arithmetic of the quantized update, as plain torch ops on integer tensors.

Every function takes and returns int64 tensors holding integer values (narrower dtypes are
widened first), with Python-int shifts and divisors: no branching on tensor values, so the
same code traces to ONNX. The rules, written once here:

* `floor_shift(x, k)`: floor(x / 2^k), the arithmetic shift right (negatives round down,
  -3 >> 1 == -2, not -1). k <= 0 shifts left.
* `div_round(x, d)`: x / d rounded half to even (the rule of `quant.spec.quantize` and of
  ONNX QuantizeLinear); `round_shift(x, k)` is the power-of-two case, the requantization of
  an accumulator to a coarser power-of-two scale.
* `stochastic_shift(x, k, noise)`: floor((x + r) / 2^k) with r uniform in [0, 2^k) taken from
  explicit random bits, an unbiased rounding of x / 2^k.
* `saturate(x, lo, hi)`: the clamp that precedes every narrowing cast.
* `int_matmul`: an integer matrix product, int64 result, exact (eager in float64; ONNX:
  MatMul on int64).
* `int_conv2d`, `int_conv2d_weight`: 8-bit x 8-bit 3x3 convolutions with int32 results. Eager
  torch computes them in float64, exact here (integer operands, every partial sum below
  2^31 < 2^53); traced to ONNX they are `ConvInteger` (uint8|int8 x int8 -> int32), the
  standard integer convolution. The weight-gradient conv sums over the batch in chunks small
  enough that each chunk's int32 sum cannot overflow; the chunks add in int64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
NOISE_BITS = 16  # random bits per element for stochastic rounding, drawn uniform in [0, 2^16)


def widen(x: Tensor) -> Tensor:
    """Any integer tensor as int64 (the working width of every step below)."""
    return x.to(torch.int64)


def floor_shift(x: Tensor, k: int) -> Tensor:
    """floor(x / 2^k) for k > 0 (arithmetic shift right, rounds toward -inf); x * 2^-k else."""
    if k <= 0:
        return x * (1 << -k)
    return torch.div(x, 1 << k, rounding_mode="floor")


def div_round(x: Tensor, d: int) -> Tensor:
    """x / d rounded to the nearest integer, ties to even; d a positive Python int."""
    if d == 1:
        return x
    q = torch.div(x, d, rounding_mode="floor")
    r = x - q * d  # 0 <= r < d
    odd = torch.remainder(q, 2)
    up = (2 * r > d) | ((2 * r == d) & (odd == 1))
    return q + up.to(x.dtype)


def round_shift(x: Tensor, k: int) -> Tensor:
    """x / 2^k rounded half to even for k > 0; x * 2^-k (exact) for k <= 0."""
    if k <= 0:
        return x * (1 << -k)
    return div_round(x, 1 << k)


def saturate(x: Tensor, lo: int, hi: int) -> Tensor:
    """Clip to [lo, hi]: done before any cast to a narrower type, so nothing wraps."""
    return torch.clamp(x, lo, hi)


def saturate32(x: Tensor) -> Tensor:
    """An int32 accumulator with saturation: the exact (int64) sum clipped to the int32 range."""
    return saturate(x, INT32_MIN, INT32_MAX)


def stochastic_shift(x: Tensor, k: int, noise: Tensor, noise_bits: int = NOISE_BITS) -> Tensor:
    """Unbiased stochastic rounding of x / 2^k with explicit random bits.

    `noise` holds integers uniform in [0, 2^noise_bits), one per element of x (any integer
    dtype). For 0 < k <= noise_bits the top k bits of the noise give r uniform in [0, 2^k) and
    the result is floor((x + r) / 2^k), whose mean is exactly x / 2^k. For k > noise_bits the
    low k - noise_bits bits of x are first dropped by a floor shift (a bias below 2^-noise_bits
    of one output unit). For k <= 0 the result is exact (x * 2^-k) and the noise is unused.
    """
    if k <= 0:
        return x * (1 << -k)
    r = widen(noise)
    if k > noise_bits:
        x = floor_shift(x, k - noise_bits)
        k = noise_bits
    else:
        r = floor_shift(r, noise_bits - k)
    return floor_shift(x + r, k)


class _MatMul(torch.autograd.Function):
    """Integer matrix product; eager in float64 (exact while sum |a||b| < 2^53, far above any
    operand range of the step), traced as ONNX MatMul on int64."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # noqa: ARG004
        return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int64)

    @staticmethod
    def symbolic(g, a, b):  # the TorchScript exporter's hook
        return g.op("MatMul", a, b)


def int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for integer matrices (M, K) x (K, N): int64 operands and result, exact."""
    return _MatMul.apply(widen(a), widen(b))


def _conv_eager(x: Tensor, w: Tensor) -> Tensor:
    """Exact conv of 8-bit integer tensors in float64 (every partial sum is far below 2^53)."""
    return F.conv2d(x.to(torch.float64), w.to(torch.float64), padding=1).to(torch.int64)


def _conv_weight_eager(x: Tensor, e: Tensor) -> Tensor:
    """Exact Hebbian sum (O, C, 3, 3) by the transposed-conv trick, in float64."""
    xt, et = x.to(torch.float64).transpose(0, 1), e.to(torch.float64).transpose(0, 1)
    return F.conv2d(xt, et, padding=1).transpose(0, 1).to(torch.int64)


class _ConvInteger(torch.autograd.Function):
    """ONNX ConvInteger (padding 1, stride 1, no zero points): 8-bit operands, int32 result."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:  # noqa: ARG004
        return _conv_eager(x, w).to(torch.int32)

    @staticmethod
    def symbolic(g, x, w):  # the TorchScript exporter's hook
        return g.op("ConvInteger", x, w, pads_i=[1, 1, 1, 1])


class _ConvIntegerWeight(torch.autograd.Function):
    """The Hebbian product as ConvInteger of the transposed tensors (batch as channels)."""

    @staticmethod
    def forward(ctx, x: Tensor, e: Tensor) -> Tensor:  # noqa: ARG004
        return _conv_weight_eager(x, e).to(torch.int32)

    @staticmethod
    def symbolic(g, x, e):
        xt = g.op("Transpose", x, perm_i=[1, 0, 2, 3])
        et = g.op("Transpose", e, perm_i=[1, 0, 2, 3])
        gw = g.op("ConvInteger", xt, et, pads_i=[1, 1, 1, 1])
        return g.op("Transpose", gw, perm_i=[1, 0, 2, 3])


def _as8(x: Tensor, signed: bool) -> Tensor:
    """An 8-bit view of integer values already in range (uint8 [0, 255] or int8 [-128, 127])."""
    return x.to(torch.int8 if signed else torch.uint8)


def int_conv2d(x: Tensor, w: Tensor, x_signed: bool = False) -> Tensor:
    """3x3, stride 1, padding 1 convolution of 8-bit x (N, C, H, W) by int8 w (O, C, 3, 3):
    int64 result, exact (ConvInteger; the caller bounds fan-in x 255 x 127 below 2^31)."""
    return _ConvInteger.apply(_as8(x, x_signed), _as8(w, True)).to(torch.int64)


def conv_weight_chunk(h: int, w: int, x_max: int = 255, e_max: int = 127) -> int:
    """Images per chunk such that one chunk's Hebbian sum stays inside int32."""
    return max(1, INT32_MAX // (h * w * x_max * e_max))


def int_conv2d_weight(x: Tensor, e: Tensor, x_signed: bool = False) -> Tensor:
    """The Hebbian product of a 3x3/padding-1 conv: gW[o, c, i, j] = sum_{n, h, w}
    e[n, o, h, w] * x[n, c, h + i - 1, w + j - 1] (zero outside), shape (O, C, 3, 3), int64,
    exact. x 8-bit, e int8 values.

    A convolution of the input by the error with the batch as the channel axis (the
    transposed-conv trick of `edge.nets.layer_backward`), one ConvInteger per chunk of the
    batch whose int32 sum cannot overflow; the chunks add in int64.
    """
    x8, e8 = _as8(x, x_signed), _as8(e, True)
    step = conv_weight_chunk(int(x.shape[2]), int(x.shape[3]))
    total = None
    for s in range(0, x.shape[0], step):
        part = _ConvIntegerWeight.apply(x8[s : s + step], e8[s : s + step]).to(torch.int64)
        total = part if total is None else total + part
    return total

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
* `int_matmul`, `int_conv2d`, `int_conv2d_weight`: exact integer products with an int64
  result. They compute in float64, which is exact here: all operands are integers and every
  partial sum is bounded by sum |a||b| < 2^53 (the callers check the bounds that matter).
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


def _exact(y: Tensor) -> Tensor:
    return y.to(torch.int64)


def int_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for integer matrices (..., M, K) x (K, N), exact, int64 result."""
    return _exact(a.to(torch.float64) @ b.to(torch.float64))


def int_conv2d(x: Tensor, w: Tensor) -> Tensor:
    """3x3, stride 1, padding 1 convolution of integer x (N, C, H, W) by w (O, C, 3, 3), exact."""
    return _exact(F.conv2d(x.to(torch.float64), w.to(torch.float64), padding=1))


def int_conv2d_weight(x: Tensor, e: Tensor) -> Tensor:
    """The Hebbian product of a 3x3/padding-1 conv: gW[o, c, i, j] = sum_{n, h, w}
    e[n, o, h, w] * x[n, c, h + i - 1, w + j - 1] (zero outside), exact, shape (O, C, 3, 3).

    Written as a convolution of the input by the error with the batch as the channel axis
    (the transposed-conv trick of `edge.nets.layer_backward`).
    """
    xt = x.to(torch.float64).transpose(0, 1)
    et = e.to(torch.float64).transpose(0, 1)
    return _exact(F.conv2d(xt, et, padding=1).transpose(0, 1))

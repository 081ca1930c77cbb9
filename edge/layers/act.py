"""Elementwise activations: ReLU, ReLU6 and Identity (the requantization point with no
nonlinearity).

Float: y = act(x); the local adjoint is g * act'(x), and act' is read off the *output*:
    ReLU   act'(x) = [y > 0]             ReLU6  act'(x) = [0 < y < 6]
so an activation keeps only its output (which the next primitive holds anyway), and a
max-pool right after it may apply act' at its own (pooled) output instead: at the window's
argmax the two are equal (`edge.nets.block` fuses that pair, so the full-size output dies in
the forward).

Integer form: an activation is where an int32 accumulator is requantized to 8 bits, and the
nonlinearity is the clamp of that requantization:
    y = clamp(round_half_even(acc * 2^(f_y - f_acc)), lo, hi)
    ReLU [0, 255] uint8;  ReLU6 [0, min(255, floor(6 * 2^f_y))] uint8;  Identity [-128, 127] int8
f_y comes from the plan (calibrated: a high percentile of the accumulator's real values).
The integer adjoint masks the int8 error with the same comparisons on the uint8 output
(saturation at 255 passes the error through: straight-through, as in float).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edge.layers import intops
from edge.layers.base import QT, Primitive

DTYPE = {True: torch.int8, False: torch.uint8}


@dataclass(frozen=True)
class Activation(Primitive):
    """An elementwise activation whose derivative is a function of its output."""

    is_activation = True
    signed = False  # integer output int8 (signed) or uint8

    def apply(self, x: Tensor, inplace: bool = False) -> Tensor:
        raise NotImplementedError

    def derivative(self, y: Tensor) -> Tensor | None:
        """act' as a 0/1 (or slope) tensor from the output y; None: 1 everywhere."""
        raise NotImplementedError

    def forward(self, ex, p, x, inplace: bool = False):
        y = self.apply(x, inplace and not ex.traced)
        return y, y

    def adjoint(self, ex, p, y, g, need_gx):
        if not ex.traced:
            gx = self.eager_adjoint(y, g)
            if gx is not None:
                return {}, gx
        d = self.derivative(y)
        return {}, g if d is None else g * d.to(g.dtype)

    def eager_adjoint(self, y: Tensor, g: Tensor) -> Tensor | None:
        """g * act'(y) as one aten kernel (eager), where one exists; None: the generic
        product (compare, cast, multiply: three passes)."""
        return None

    # ------------------------------------------------------------------ integer
    def int_range(self, f_y: int) -> tuple[int, int]:
        return (-128, 127) if self.signed else (0, 255)

    def int_forward(self, ex, key, p, x):
        lo, hi = self.int_range(0)
        f_y = ex.out_exponent(key, x, hi)
        lo, hi = self.int_range(f_y)
        # int32 is exact for a right shift (nothing grows beyond |acc|); a left shift widens
        t = x.t.to(torch.int32) if x.f >= f_y and x.t.dtype != torch.int64 else intops.widen(x.t)
        y = intops.saturate(intops.round_shift(t, x.f - f_y), lo, hi)
        out = QT(y.to(DTYPE[self.signed]), f_y)
        return out, out

    def int_mask(self, y: QT) -> Tensor | None:
        """Where the integer error passes (a bool tensor); None: everywhere."""
        return None

    def int_adjoint(self, ex, key, p, y, g, need_gx):
        m = self.int_mask(y)
        return {}, g if m is None else QT(torch.where(m, g.t, 0), g.f, g.c)


@dataclass(frozen=True)
class Identity(Activation):
    """No nonlinearity: in float a no-op; in integer a signed requantization point (after a
    conv that no activation follows, e.g. before a residual add)."""

    op = "identity"
    signed = True

    def apply(self, x, inplace=False):
        return x

    def derivative(self, y):
        return None


@dataclass(frozen=True)
class ReLU(Activation):
    op = "relu"
    torch_type = nn.ReLU

    def apply(self, x, inplace=False):
        return F.relu(x, inplace=inplace)

    def derivative(self, y):
        return y > 0

    def eager_adjoint(self, y, g):
        return torch.ops.aten.threshold_backward(g, y, 0)  # g where y > 0, else 0

    def int_mask(self, y):
        return y.t > 0


@dataclass(frozen=True)
class ReLU6(Activation):
    op = "relu6"
    torch_type = nn.ReLU6

    def apply(self, x, inplace=False):
        return F.relu6(x, inplace=inplace)

    def derivative(self, y):
        return (y > 0) & (y < 6)

    def eager_adjoint(self, y, g):
        return torch.ops.aten.hardtanh_backward(g, y, 0.0, 6.0)  # g where 0 < y < 6, else 0

    def int_range(self, f_y):
        return 0, min(255, math.floor(math.ldexp(6.0, f_y)))

    def int_mask(self, y):
        six = math.ceil(math.ldexp(6.0, y.f))  # y < 6 * 2^f for integers y
        return (y.t > 0) & (y.t < six) if six <= 255 else y.t > 0

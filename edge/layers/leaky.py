"""LeakyReLU: y = x for x > 0, slope * x otherwise (0 < slope < 1).

Float: the derivative is read off the output, as for every activation here:
    act'(x) = 1 where y > 0, slope elsewhere          (slope > 0 keeps the sign of x in y)
so a max-pool after it may apply it at the pooled output (`edge.nets.block`).

Integer form (slope = 2^-k, k >= 1; other slopes have none): with s = f_acc - f_y,
    y = clamp(round_half_even(acc 2^-s) where acc >= 0, round_half_even(acc 2^-(s + k))
        elsewhere, -128, 127)                           int8 at the plan's f_y
and the adjoint passes the int8 error where y > 0 and round_half_even(e 2^-k) elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edge.errors import EdgeError
from edge.layers import intops
from edge.layers.act import Activation
from edge.layers.base import QT


@dataclass(frozen=True)
class LeakyReLU(Activation):
    op = "leakyrelu"
    torch_type = nn.LeakyReLU
    signed = True

    slope: float = 0.125

    def __post_init__(self) -> None:
        if not 0 < self.slope < 1:
            raise EdgeError(f"leakyrelu slope must be in (0, 1), got {self.slope}")

    @classmethod
    def from_module(cls, m: nn.LeakyReLU) -> LeakyReLU:
        return cls(float(m.negative_slope))

    def torch_module(self) -> nn.Module:
        return nn.LeakyReLU(self.slope)

    def apply(self, x, inplace=False):
        return F.leaky_relu(x, self.slope, inplace=inplace)

    def derivative(self, y):
        return (y > 0).to(y.dtype) * (1 - self.slope) + self.slope  # in y's own precision

    @property
    def shift(self) -> int:
        k = -math.log2(self.slope)
        if k != round(k):
            raise EdgeError(f"leakyrelu slope {self.slope} has no integer form; use a power of "
                            "two (0.5, 0.25, 0.125, ...)")
        return round(k)

    def int_forward(self, ex, key, p, x):
        k = self.shift
        f_y = ex.out_exponent(key, x, 127)
        t = intops.widen(x.t)
        pos = intops.round_shift(t, x.f - f_y)
        neg = intops.round_shift(t, x.f - f_y + k)
        y = intops.saturate(torch.where(t >= 0, pos, neg), -128, 127).to(torch.int8)
        out = QT(y, f_y)
        return out, out

    def int_adjoint(self, ex, key, p, y, g, need_gx):
        low = intops.round_shift(intops.widen(g.t), self.shift).to(g.t.dtype)
        return {}, QT(torch.where(y.t > 0, g.t, low), g.f, g.c)

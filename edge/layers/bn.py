"""BatchNorm with frozen statistics: a per-channel affine map, folded into the conv before it.

    y = gamma (x - mean) / sqrt(var + eps) + beta  =  x * s + t,   s = gamma / sqrt(var + eps)

What training does with it, and why. On the device, BatchNorm is inference-mode: its
statistics and affine are frozen at what the (pre)trained model holds, and wherever a conv or
linear layer precedes it, `fold` merges it into that layer (w' = s w, b' = s (b - mean) +
beta) before training starts (`edge.nets.fold_batchnorm`), so the local rule trains the
folded weights and bias: the learned per-channel shift is the bias, the scale lives in the
weights. Batch statistics are meaningless at batch 1 and would couple the samples of a
layer-local update; on-device training work (MIT's tiny-training) fuses BN the same way; and
the integer network needs it folded anyway. A BatchNorm that follows no conv (rare) stays
a frozen affine: forward x s + t, adjoint dL/dx = g s, no parameter updates, no integer form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from edge.errors import EdgeError
from edge.layers.base import Primitive, Shape


@dataclass(frozen=True)
class BatchNorm(Primitive):
    op = "bn"

    channels: int
    eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise EdgeError(f"bn needs a positive channel count, got {self.channels}")
        if not self.eps > 0:
            raise EdgeError(f"bn eps must be positive, got {self.eps}")

    def out_shape(self, shape: Shape) -> Shape:
        if shape[0] != self.channels:
            raise EdgeError(f"bn expects {self.channels} channels, gets {shape[0]}")
        return shape

    def param_shapes(self) -> dict[str, Shape]:
        return {k: (self.channels,) for k in ("gamma", "beta", "mean", "var")}

    def init(self, gen: torch.Generator) -> dict[str, Tensor]:
        c = self.channels
        return {"gamma": torch.ones(c), "beta": torch.zeros(c), "mean": torch.zeros(c),
                "var": torch.ones(c)}

    def affine(self, p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(s, t) of y = x s + t."""
        s = p["gamma"] / torch.sqrt(p["var"] + self.eps)
        return s, p["beta"] - p["mean"] * s

    @staticmethod
    def _expand(v: Tensor, x: Tensor) -> Tensor:
        return v.view(1, -1, *([1] * (x.dim() - 2)))

    def forward(self, ex, p, x):
        s, t = self.affine(p)
        return x * self._expand(s, x) + self._expand(t, x), None

    def adjoint(self, ex, p, saved, g, need_gx):
        return {}, g * self._expand(self.affine(p)[0], g)

    def fold(self, p: dict[str, Tensor], w: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """The preceding conv / linear layer's (w, b) with this BatchNorm folded in."""
        s, t = self.affine(p)
        return w * s.view(-1, *([1] * (w.dim() - 1))), b * s + t

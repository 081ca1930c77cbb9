"""Linear: y = x W^T + b on flat inputs (N, F); a map must be flattened first (`flatten`).

Closed-form local adjoint from g = dL/dy:
    dL/dW = g^T x      dL/db = sum_n g      dL/dx = g W   (only inside a block)
Integer form (x 8-bit at 2^-f_x, W int8 at 2^-f_w, b int32 at 2^-(f_x + f_w)):
    acc = x W^T + b int32 (MatMulInteger); dW = e^T x, db = sum e (int32, saturating);
    dx = requant_8(e W), int8 at the plan's f_gx, stochastically rounded.
Initialisation: He-normal over the fan-in, zero bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edge.errors import EdgeError
from edge.layers import intops
from edge.layers.base import QT, Primitive, Shape, he_normal


@dataclass(frozen=True)
class Linear(Primitive):
    op = "linear"
    has_weights = True
    trainable = ("w", "b")

    fin: int
    fout: int

    def __post_init__(self) -> None:
        if self.fin < 1 or self.fout < 1:
            raise EdgeError(f"features must be positive, got {self.fin}->{self.fout}")

    def out_shape(self, shape: Shape) -> Shape:
        if len(shape) != 1:
            raise EdgeError(f"linear expects a flat input, got shape {shape}; add a flatten")
        if shape[0] != self.fin:
            raise EdgeError(f"linear expects {self.fin} inputs, gets {shape[0]}")
        return (self.fout,)

    def param_shapes(self) -> dict[str, Shape]:
        return {"w": (self.fout, self.fin), "b": (self.fout,)}

    def init(self, gen: torch.Generator):
        return {"w": he_normal((self.fout, self.fin), self.fin, gen), "b": torch.zeros(self.fout)}

    def macs(self, shape: Shape) -> int:
        return self.fin * self.fout

    def forward(self, ex, p, x):
        return F.linear(x, p["w"], p["b"]), x

    def adjoint(self, ex, p, x, g, need_gx):
        return {"w": g.t() @ x, "b": g.sum(0)}, (g @ p["w"] if need_gx else None)

    def int_forward(self, ex, key, p, x):
        w, b = p["w"], p["b"]
        acc = intops.int_matmul(x.t, w.t.t()) + intops.widen(b.t)
        return QT(acc, x.f + w.f), x

    def int_adjoint(self, ex, key, p, x, g, need_gx):
        e8 = intops.narrow(g.t, torch.int8)
        grads = {"w": QT(intops.saturate32(intops.int_matmul(e8.t(), x.t)), x.f + g.f, g.c),
                 "b": QT(intops.saturate32(intops.widen(e8).sum(0)), g.f, g.c)}
        gx = None
        if need_gx:
            w = p["w"]
            gx = ex.requant_error(key, QT(intops.int_matmul(e8, w.t), g.f + w.f, g.c))
        return grads, gx
